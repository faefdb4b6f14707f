//! How full a connection pool is, for `/metrics`: a pool that stays at its maximum with no idle
//! connection is the first sign that requests are about to wait for the database.

/// One connection pool's usage at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    /// `main` on PostgreSQL; `writer` and `readers` on SQLite.
    pub pool: &'static str,
    pub open: u32,
    pub idle: usize,
    pub max: u32,
}

impl PoolUsage {
    pub fn of<DB: sqlx::Database>(pool_name: &'static str, pool: &sqlx::Pool<DB>) -> Self {
        Self {
            pool: pool_name,
            open: pool.size(),
            idle: pool.num_idle(),
            max: pool.options().get_max_connections(),
        }
    }
}
