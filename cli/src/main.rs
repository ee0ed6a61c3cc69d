use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(memwatch_cli::run(std::env::args_os()))
}
