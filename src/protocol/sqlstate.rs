//! SQLSTATE codes the proxy emits itself (Postgres appendix A).

pub const PROTOCOL_VIOLATION: &str = "08P01";
pub const CONNECTION_FAILURE: &str = "08006";
pub const CANNOT_CONNECT_NOW: &str = "57P03";
pub const ADMIN_SHUTDOWN: &str = "57P01";
pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
pub const TOO_MANY_CONNECTIONS: &str = "53300";
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
pub const INVALID_AUTHORIZATION: &str = "28000";
pub const QUERY_CANCELED: &str = "57014";
pub const IO_ERROR: &str = "58030";
pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
pub const ACTIVE_SQL_TRANSACTION: &str = "25001";
