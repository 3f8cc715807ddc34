//! sidegate-operator: reconciles AIGateway and ProviderKey resources (work in progress).

fn main() {
    println!("sidegate-operator {}", env!("CARGO_PKG_VERSION"));
}
