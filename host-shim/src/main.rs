//! `portless`: the host daemon and CLI. Not built out yet.

fn main() {
    eprintln!("portless: not implemented yet");
    std::process::exit(2);
}
