//! Bulk insert throughput of `store_batch`: batches of 1 000 readings from 10 sites written by
//! 4 concurrent tasks, on a SQLite file and on PostgreSQL when `CAUDAL_TEST_DATABASE_URL` is
//! set. Prints readings per second; asserts nothing.
//!
//! `cargo bench -p caudal-cloud --bench store`

use caudal_cloud::catchment::site;
use caudal_cloud::core::db::Db;
use caudal_cloud::telemetry::store;
use caudal_common::{Batch, DeviceId, Quality, Reading, Seq, SiteId};
use chrono::{TimeZone, Utc};
use std::time::Instant;

const SITES: usize = 10;
const BATCHES_PER_SITE: usize = 20;
const READINGS_PER_BATCH: usize = 1_000;
const WRITERS: usize = 4;

fn batch(site: &SiteId, n: usize) -> Batch {
    let t0 = Utc
        .with_ymd_and_hms(2026, 11, 28, 0, 0, 0)
        .single()
        .expect("time");
    let device = DeviceId::new("fm1").expect("id");
    let readings = (0..READINGS_PER_BATCH)
        .map(|i| {
            let k = (n * READINGS_PER_BATCH + i) as u32;
            Reading {
                seq: Seq::new(90_000_000, k + 1),
                device: device.clone(),
                ts: t0 + chrono::Duration::seconds(i64::from(k)),
                q: Quality::GOOD,
                flow_lps: Some(12.5 + f64::from(k % 100) / 10.0),
                total_m3: Some(123_456.789 + f64::from(k) * 0.0125),
                level_m: Some(42.17),
                extra: Default::default(),
            }
        })
        .collect();
    Batch {
        v: 1,
        site: site.clone(),
        batch: format!("bench-{n}"),
        sent_at: t0,
        readings,
        events: Vec::new(),
        gaps: Vec::new(),
    }
}

async fn run(name: &str, db: Db) {
    db.migrate().await.expect("migrate");
    let mut work = Vec::new();
    for s in 0..SITES {
        let id = SiteId::new(format!("bench-{s}")).expect("id");
        site::add(&db, &id, "").await.expect("add site");
        for n in 0..BATCHES_PER_SITE {
            work.push(batch(&id, n));
        }
    }
    let total = work.len() * READINGS_PER_BATCH;
    let work = std::sync::Arc::new(std::sync::Mutex::new(work));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let (db, work) = (db.clone(), work.clone());
        tasks.spawn(async move {
            loop {
                let Some(b) = work.lock().expect("lock").pop() else {
                    return;
                };
                store::store_batch(&db, &b, Utc::now())
                    .await
                    .expect("store");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name}: {total} readings in {} batches of {READINGS_PER_BATCH}, {WRITERS} writers: \
         {secs:.2} s, {:.0} readings/s",
        total / READINGS_PER_BATCH,
        total as f64 / secs
    );
    db.close().await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        );
        run("sqlite", Db::connect(&url, 4).await.expect("sqlite")).await;

        if let Ok(base) = std::env::var("CAUDAL_TEST_DATABASE_URL") {
            let schema = format!("caudal_bench_{}", std::process::id());
            let admin = sqlx::PgPool::connect(&base).await.expect("postgres");
            let create = format!("CREATE SCHEMA {schema}");
            sqlx::query(sqlx::AssertSqlSafe(create))
                .execute(&admin)
                .await
                .expect("schema");
            let sep = if base.contains('?') { '&' } else { '?' };
            let url = format!("{base}{sep}options[search_path]={schema}");
            run("postgres", Db::connect(&url, 8).await.expect("postgres")).await;
            let drop = format!("DROP SCHEMA {schema} CASCADE");
            let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&admin).await;
            admin.close().await;
        }
    });
}
