fn main() {
    eprintln!("meshd: not yet implemented");
    std::process::exit(2);
}
