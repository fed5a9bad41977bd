//! The help texts the commands end with: which settings they read, and the exit codes.

/// The settings of every command that opens the database.
pub const DB_HELP: &str = concat!(
    "Settings (environment):\n",
    "  DATABASE_URL          Postgres to use (unset: a private cluster in ORDERLINE_DATA_DIR,\n",
    "                        started for the command and stopped after it)\n",
    "  ORDERLINE_DATA_DIR    folder of the private cluster [default: .orderline]\n",
    "  ORDERLINE_PG_BIN      folder of initdb/pg_ctl [default: newest /usr/lib/postgresql/*/bin]\n",
    "  RUST_LOG              log filter [default: info,sqlx=warn]; NO_COLOR turns colours off\n\n",
    "Exit codes: 0 done (also when the reader of the output stops reading), 2 failed,\n",
    "130 interrupted; verify: 1 when the log or a read model is not intact."
);

/// What every command's help ends with.
pub const ENV_HELP: &str = concat!(
    "Settings come from the environment (a bad value stops the command, naming it).\n\n",
    "Database:\n",
    "  DATABASE_URL          Postgres to use (unset: a private cluster in ORDERLINE_DATA_DIR)\n",
    "  ORDERLINE_DATA_DIR    folder of the private cluster [default: .orderline]\n",
    "  ORDERLINE_PG_BIN      folder of initdb/pg_ctl [default: newest /usr/lib/postgresql/*/bin]\n",
    "  ORDERLINE_DB_POOL_SIZE  largest number of Postgres connections [default: 16]\n",
    "  RUST_LOG              log filter [default: info,sqlx=warn]; NO_COLOR turns colours off\n\n",
    "Server (serve) and tokens (token): see `orderline serve --help`.\n\n",
    "Exit codes: 0 done, 1 verify found the log or a read model not intact, 2 failed,\n",
    "130 interrupted."
);
