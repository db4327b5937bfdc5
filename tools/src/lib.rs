//! Tools around kci-receiver, kept out of the service (its production image builds only the
//! `kci-receiver` package):
//!
//! - [`simulator`]: a simulator of the Fibre Cafe gateway (and of its Tenant API);
//! - [`bench`]: the benchmark, which starts the real `kci-receiver` binary and drives it with the
//!   simulator;
//! - [`drill`]: the reliability drills (kill -9, broker outage, database outage and freeze, all
//!   under load);
//! - [`service`], [`delivery`]: the kci-receiver under test as a process of its own, and the
//!   consumer that checks what reaches RabbitMQ (loss, duplicates, per-entity order);
//! - [`tcp_proxy`]: a TCP proxy that can cut or freeze a connection to a dependency, used by the
//!   benchmark, the drills and the integration tests;
//! - [`cli`]: the `kci-tools` command line.

pub mod bench;
pub mod cli;
pub mod delivery;
pub mod drill;
pub mod service;
pub mod simulator;
pub mod tcp_proxy;

use cli::SimulateArgs;

/// `kci-tools simulate`: plays the gateway (and, optionally, its Tenant API) and prints a summary.
pub async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    use simulator::{Options, run};
    let options = Options {
        base_url: args.url.trim_end_matches('/').to_owned(),
        other_base_urls: args
            .also_url
            .iter()
            .map(|url| url.trim_end_matches('/').to_owned())
            .collect(),
        gateway_user: args.gateway_user,
        gateway_password: args.gateway_password,
        admin: args
            .admin_password
            .map(|password| (args.admin_user, password)),
        egress_prefix: args.via_egress,
        orders: args.orders,
        ethernet_orders: args.ethernet_orders,
        unsolicited_ceases: args.unsolicited_ceases,
        tests: args.tests,
        problems: args.problems,
        concurrency: args.concurrency,
        rate: args.rate,
        duration: args.duration_seconds.map(std::time::Duration::from_secs),
        seed: args.seed,
        redelivery_chance: args.redeliveries,
        out_of_order_chance: args.out_of_order,
        gap_chance: args.gaps,
        late_registration_chance: args.late_registrations,
        first_gateway_id: args.first_gateway_id,
        retry_unavailable: args
            .retry_unavailable
            .then(|| std::time::Duration::from_secs(1)),
        stop: None,
        drop_rate: args.drop_rate,
        gateway_record: None,
    };
    let tenant_api = match &args.serve_tenant_api {
        Some(address) => {
            let api = simulator::tenant_api::SimulatedTenantApi::start(address)?;
            println!(
                "simulated Tenant API at {0}: egress.upstream_base_url = {0}/v1, egress.token_url = {0}/token",
                api.base_url
            );
            Some(api)
        }
        None => None,
    };
    let options = Options {
        gateway_record: tenant_api.as_ref().map(|api| api.record.clone()),
        ..options
    };
    let (base_url, admin) = (options.base_url.clone(), options.admin.clone());
    let report = run(options).await?;
    println!("{}", report.summary());
    if let (Some(seconds), Some(admin)) = (args.await_recovery_seconds, admin) {
        let recovery = simulator::await_recovery(
            &base_url,
            &admin,
            &report.dropped,
            std::time::Duration::from_secs(seconds),
        )
        .await?;
        println!("{}", recovery.summary());
        if !recovery.missing.is_empty() {
            println!("not recovered: {}", recovery.missing.join(", "));
        }
    }
    if let Some(api) = tenant_api {
        println!(
            "simulated Tenant API: {} creating calls answered, {} tokens issued",
            api.created(),
            api.tokens_issued()
        );
    }
    Ok(())
}
