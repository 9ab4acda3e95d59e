//! Load figure (not an assertion): one bus client polling 32 simulated meters once a second
//! over Modbus TCP, both in this process. Prints CPU time per wall second.
//!
//! `cargo test -p caudal-agent --test modbus sim_load -- --ignored --nocapture`

use caudal_agent::config::Link;
use caudal_agent::modbus::BusClient;
use caudal_agent::register::{ByteOrder, Channel, DataType, Fc, Point, assemble, plan_reads};
use caudal_agent::simulator::{Model, SimulatedMeter, Simulator};
use caudal_common::units::Unit;
use std::time::{Duration, Instant};

fn point(channel: Channel, address: u16, data_type: DataType, unit: Unit) -> Point {
    Point {
        channel,
        fc: Fc::Holding,
        address,
        data_type,
        order: ByteOrder::CDAB,
        scale: 1.0,
        offset: 0.0,
        unit,
        fraction_scale: 1e-9,
        overflow_factor: 1.0,
        overflow_address: None,
        rollover_at: None,
        water_column: None,
    }
}

/// User + system CPU seconds of this process, from /proc (Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, in clock ticks (100 per second).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints a load figure; run by hand"]
async fn thirty_two_meters_polled_every_second() {
    let points = vec![
        point(Channel::Flow, 2008, DataType::F32, Unit::CubicMetrePerHour),
        point(
            Channel::Total,
            2609,
            DataType::F32Overflow,
            Unit::CubicMetre,
        ),
        point(Channel::Level, 2700, DataType::F32, Unit::Metre),
    ];
    let mut sim = Simulator::new();
    for unit in 1..=32 {
        sim = sim.with_unit(unit, SimulatedMeter::new(points.clone(), Model::default()));
    }
    let sim = sim.start().await.unwrap();
    let link = Link::Tcp {
        address: sim.addr.to_string(),
    };
    let mut client = BusClient::connect("load", &link, Duration::from_secs(1))
        .await
        .unwrap();
    let blocks = plan_reads(&points, 125);

    let seconds = 10;
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut reads = 0u64;
    for _ in 0..seconds {
        tick.tick().await;
        for unit in 1..=32 {
            let mut replies = Vec::new();
            for b in &blocks {
                let r = client
                    .read(unit, b.fc, b.address, b.count, Duration::from_secs(1))
                    .await;
                replies.push(Some(r.unwrap()));
                reads += 1;
            }
            for (p, w) in points.iter().zip(assemble(points.len(), &blocks, &replies)) {
                assert!(p.decode(&w.unwrap()).unwrap().is_finite());
            }
        }
    }
    let (cpu, wall) = (cpu_seconds() - cpu0, wall0.elapsed().as_secs_f64());
    println!(
        "32 meters x {} blocks, {reads} reads in {wall:.1} s wall: {cpu:.2} s CPU = {:.1}% of one core (client + simulator, {} build)",
        blocks.len(),
        100.0 * cpu / wall,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
}
