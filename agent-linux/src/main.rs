//! `portless-agent`: the guest agent for Linux. Not built out yet.

fn main() {
    eprintln!("portless-agent: not implemented yet");
    std::process::exit(2);
}
