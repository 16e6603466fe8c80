//! `keypool-mock`: run the OpenAI-compatible mock server from the command line.
//! See `keypool-mock --help`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(keypool_mock::run_cli(args));
}
