//! The `skald` binary: everything is in the library; see `skald::cli`.

fn main() -> std::process::ExitCode {
    skald::cli::main()
}
