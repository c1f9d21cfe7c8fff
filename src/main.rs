//! The `hici` binary (see `hici --help`).

fn main() -> std::process::ExitCode {
    hici_cli::main_entry()
}
