//! The daemon's own files and the few system calls it makes outside the ivshmem server
//! (here so that `unsafe` stays in two small modules): private files, free disk space.

use std::fs::File;
use std::io;
use std::path::Path;

/// Opens the file at `path` for reading and writing, creating it private (mode 0600) if it
/// is missing, never truncating it and never through a symbolic link (`O_NOFOLLOW`): the
/// daemon's own files (records, lock, regions), which nobody else may read or redirect.
pub fn open_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Creates a new file at `path` for reading and writing, private (mode 0600); an existing
/// file or link there is an error (`O_EXCL`), so nothing else is ever written through.
pub fn create_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Free bytes for unprivileged users on the file system of `dir`, if it can be asked.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string that outlives the call; `st` is written by
    // the kernel on success and read only then.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: `statvfs` returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The uid of the user called `name` in the system's user database (`getpwnam_r`).
pub fn uid_of(name: &str) -> io::Result<u32> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the name contains NUL"))?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut pwd = std::mem::MaybeUninit::<libc::passwd>::uninit();
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: `cname` is NUL-terminated; `pwd`, `buf` (with its length) and `found` are
    // valid out-pointers for the call, which writes the entry's strings into `buf`.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            pwd.as_mut_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if found.is_null() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no such user"));
    }
    // SAFETY: a non-null result points at `pwd`, which `getpwnam_r` filled in.
    Ok(unsafe { pwd.assume_init() }.pw_uid)
}
