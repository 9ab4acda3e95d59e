//! The compliance month report over 1 000 obras × one month of hourly slots (720 each, April
//! 2026 in UTC-4; nine in ten accepted with their exchange, the rest held, failed or pending),
//! on a SQLite file and on PostgreSQL when `CAUDAL_TEST_DATABASE_URL` is set. Prints how long
//! the all-obras report and one obra's report with its slots take; asserts nothing. Target:
//! the all-obras report in under 5 s on 2 cores.
//!
//! `cargo bench -p caudal-cloud --bench report`

use caudal_cloud::catchment::point::{self, NewPoint};
use caudal_cloud::compliance::report::{self, Filter, Month};
use caudal_cloud::compliance::settings::{self, PointBody};
use caudal_cloud::compliance::slot::{self, Period};
use caudal_cloud::compliance::store::{self, Mode, NewSlot, SlotState};
use caudal_cloud::compliance::value::Values;
use caudal_cloud::core::db::Db;
use chrono::{NaiveDate, Utc};
use std::time::Instant;

const POINTS: usize = 1_000;
const RUNS: usize = 3;

async fn fill(db: &Db, month: Month) -> usize {
    let now = Utc::now();
    let grid = slot::grid(Period::Hourly, month.start(), month.end(), 10_000);
    let values = Values {
        caudal: "10.50".into(),
        totalizador: Some("123456".into()),
        nivel: Some("9.85".into()),
        altura: None,
    };
    for i in 0..POINTS {
        let new: NewPoint = serde_json::from_value(serde_json::json!({
            "name": format!("Pozo {i}"), "kind": "groundwater",
            "obra_code": format!("OB-0101-{}", i + 1), "dga_standard": "mayor",
        }))
        .expect("point");
        let p = point::create(db, &new).await.expect("create");
        settings::put_point(
            db,
            p.id,
            &PointBody {
                mode: Some(Mode::Off),
                start_date: NaiveDate::from_ymd_opt(2026, 4, 1),
                ..PointBody::default()
            },
            "bench",
            now,
        )
        .await
        .expect("settings");
        let slots: Vec<NewSlot> = grid
            .iter()
            .enumerate()
            .map(|(k, at)| NewSlot {
                point_id: p.id,
                slot_at: *at,
                state: match k % 10 {
                    0 => [SlotState::Held, SlotState::Failed, SlotState::Pending][k % 3],
                    _ => SlotState::Accepted,
                },
                values: Some(values.clone()),
                reason: None,
                detail: String::new(),
            })
            .collect();
        store::insert_slots(db, &slots, now).await.expect("slots");
    }
    // One accepting exchange per accepted slot, ten minutes after it.
    let sql = match db {
        Db::Sqlite(_) => {
            "INSERT INTO compliance_exchanges (point_id, slot_at, attempt, sent_at, request, \
             http_status, response, outcome, answered_at) SELECT point_id, slot_at, 1, \
             slot_at + 600000000, '{}', 200, '', 'accepted', slot_at + 600000000 FROM \
             compliance_slots WHERE state = 'accepted'"
        }
        Db::Postgres(_) => {
            "INSERT INTO compliance_exchanges (point_id, slot_at, attempt, sent_at, request, \
             http_status, response, outcome, answered_at) SELECT point_id, slot_at, 1, \
             slot_at + INTERVAL '10 minutes', '{}', 200, '', 'accepted', \
             slot_at + INTERVAL '10 minutes' FROM compliance_slots WHERE state = 'accepted'"
        }
    };
    match db {
        Db::Sqlite(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
        Db::Postgres(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
    }
    .expect("exchanges");
    POINTS * grid.len()
}

async fn run(name: &str, db: Db) {
    db.migrate().await.expect("migrate");
    let month = Month::parse("2026-04").expect("month");
    let t = Instant::now();
    let slots = fill(&db, month).await;
    println!(
        "{name}: {POINTS} obras, {slots} slots stored in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let now = Utc::now();
    let mut all = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let r = report::month_report(&db, month, &Filter::default(), now)
            .await
            .expect("report");
        all.push(t.elapsed().as_secs_f64());
        assert_eq!(r.len(), POINTS);
    }
    all.sort_by(f64::total_cmp);
    let mut one = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        report::point_month(&db, 1, month, now)
            .await
            .expect("report")
            .expect("point");
        one.push(t.elapsed().as_secs_f64());
    }
    one.sort_by(f64::total_cmp);
    println!(
        "{name}: month report of every obra: median {:.2} s (of {RUNS}); one obra with its \
         slots: median {:.3} s",
        all[RUNS / 2],
        one[RUNS / 2]
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
