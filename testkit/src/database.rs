//! A database of the test's own for the cloud: a SQLite file, or a fresh schema in the
//! PostgreSQL database of `CAUDAL_TEST_DATABASE_URL` (`options[search_path]` in the URL points
//! the cloud at it), dropped when the test is done. Tests, scenarios and benches sharing one
//! PostgreSQL never see each other's rows.

use std::path::Path;

/// One test's database, removed when dropped (the PostgreSQL schema; a SQLite file goes with
/// its directory).
pub struct TestDb {
    /// `sqlite` or `postgres`.
    pub name: &'static str,
    /// What the cloud's `database.url` is set to.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_schema: Option<(String, String)>,
}

impl std::fmt::Debug for TestDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: only the schema.
        f.debug_struct("TestDb")
            .field("name", &self.name)
            .field("schema", &self.pg_schema.as_ref().map(|(_, s)| s))
            .finish_non_exhaustive()
    }
}

impl TestDb {
    /// A SQLite file in a fresh temporary directory.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut db = TestDb::sqlite_file(&dir.path().join("caudal.db"));
        db._dir = Some(dir);
        db
    }

    /// The SQLite file `path` (created when the cloud opens it), in a directory the caller keeps.
    pub fn sqlite_file(path: &Path) -> TestDb {
        TestDb {
            name: "sqlite",
            url: format!("sqlite://{}?mode=rwc", path.display()),
            _dir: None,
            pg_schema: None,
        }
    }

    /// A fresh schema in the PostgreSQL database of `CAUDAL_TEST_DATABASE_URL`, if set; panics
    /// if it is set but PostgreSQL does not answer, or if it is not set and the run requires
    /// PostgreSQL ([`crate::services`]).
    pub async fn postgres() -> Option<TestDb> {
        let base = crate::services::database_url()?;
        let db = TestDb::postgres_at(&base)
            .await
            .expect("CAUDAL_TEST_DATABASE_URL is set but PostgreSQL does not answer");
        Some(db)
    }

    /// A fresh schema in the PostgreSQL database at `base`.
    pub async fn postgres_at(base: &str) -> Result<TestDb, sqlx::Error> {
        let schema = format!(
            "caudal_test_{}_{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        let pool = sqlx::PgPool::connect(base).await?;
        let created = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&pool)
            .await;
        pool.close().await;
        created?;
        let sep = if base.contains('?') { '&' } else { '?' };
        Ok(TestDb {
            name: "postgres",
            url: format!("{base}{sep}options[search_path]={schema}"),
            _dir: None,
            pg_schema: Some((base.to_string(), schema)),
        })
    }

    /// SQLite, then PostgreSQL when configured.
    pub async fn all() -> Vec<TestDb> {
        let mut v = vec![TestDb::sqlite()];
        v.extend(TestDb::postgres().await);
        v
    }

    /// PostgreSQL when configured, otherwise the SQLite file `path`.
    pub async fn postgres_or_sqlite_file(path: &Path) -> TestDb {
        match TestDb::postgres().await {
            Some(db) => db,
            None => TestDb::sqlite_file(path),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((base, schema)) = self.pg_schema.take() else {
            return;
        };
        // Drop runs inside the test's runtime: clean up on a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(pool) = sqlx::PgPool::connect(&base).await {
                    let _ =
                        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                            .execute(&pool)
                            .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}
