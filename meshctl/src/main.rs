fn main() {
    eprintln!("meshctl: not yet implemented");
    std::process::exit(2);
}
