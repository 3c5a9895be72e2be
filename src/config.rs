//! Configuration, read from the environment with defaults that point at the local
//! services, so that `skald run` works on a fresh development machine unconfigured.

use std::path::PathBuf;
use std::time::Duration;

/// Everything a skald process needs to know to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// `DATABASE_URL`: skald's PostgreSQL database; created if it does not exist.
    pub database_url: String,
    /// `SKALD_TRANSPORT`: which queue skald's messages travel on (default `postgres`:
    /// skald's own database, so that a newcomer needs one service, not two).
    pub transport: TransportKind,
    /// `AMQP_URL`: the RabbitMQ broker, or the nodes of a cluster as a comma-separated
    /// list of URLs (skald connects to the first that answers, and to the next one
    /// when its node goes away).
    pub amqp_url: String,
    /// `REDIS_URL`: the Redis server, with `SKALD_TRANSPORT=redis`.
    pub redis_url: String,
    /// `SKALD_REDIS_LEASE_MS`: how long a Redis partition lease lasts without renewal
    /// (default 10000, at least 300): the delay before another process takes over the
    /// partitions of one that died.
    pub redis_lease: Duration,
    /// `SKALD_REDIS_WAIT_REPLICAS` and `SKALD_REDIS_WAIT_MS`: on Redis, whether every
    /// write skald counts on (publish, delayed publish, dead letter, ack) waits for
    /// replicas to have it (`WAIT`) before it counts as done (default: no).
    pub redis_wait: RedisWait,
    /// `SKALD_SAGAS_DIR`: where the `*.yaml` saga definitions are (default `sagas`).
    pub sagas_dir: PathBuf,
    /// `SKALD_NAMESPACE`: prefix of every exchange and queue skald declares, so that
    /// several deployments (or tests) share a broker without meeting (default `skald`).
    pub namespace: String,
    /// `SKALD_PARTITIONS`: how many partition queues the intake is hashed over (by
    /// aggregate id). Every process of a deployment must use the same number.
    pub partitions: u16,
    /// `SKALD_SUBSCRIBE_STAGGER_MS`: pause between subscribing to two partitions, so
    /// that processes started together share them (default 250; 0 in tests).
    pub subscribe_stagger: Duration,
    /// `SKALD_PREFETCH`: unacknowledged deliveries this process holds at most. It
    /// bounds the work (and memory) in flight: actor mailboxes never hold more.
    pub prefetch: u16,
    /// `SKALD_DB_POOL`: PostgreSQL connections this process opens at most. The server
    /// allows 100 in all; leave room for other processes and tools.
    pub db_pool: u32,
    /// `SKALD_ACTOR_IDLE_MS`: an aggregate's actor stops after this long without work.
    pub actor_idle: Duration,
    /// `SKALD_HTTP_ADDR`: where the dashboard API listens (default `127.0.0.1:8080`;
    /// port 0 picks a free port).
    pub http_addr: std::net::SocketAddr,
    /// `SKALD_API_TOKEN`: when set, every `/api/v1` request needs it as a bearer token;
    /// required to listen on a non-loopback address.
    pub api_token: Option<String>,
    /// `SKALD_STARTUP_TIMEOUT_MS`: how long start-up waits for PostgreSQL and RabbitMQ
    /// to become reachable before giving up (default 60 s). A broker that answers but
    /// refuses skald's login or topology is not waited for: that is a configuration
    /// error.
    pub startup_timeout: Duration,
    /// `SKALD_SHUTDOWN_TIMEOUT_MS`: how long a graceful shutdown waits for in-flight
    /// steps before closing anyway (unacked work is redelivered, never lost).
    pub shutdown_timeout: Duration,
    /// `SKALD_STUCK_AFTER_MS`: a message held by infrastructure failures this long is
    /// reported stuck (error log, `skald_stuck_messages`, `/ready` detail).
    pub stuck_after: Duration,
    /// `SKALD_ORPHANED` (or `skald run --orphaned`): what start-up does with live
    /// instances of a saga version no longer loaded (default: refuse to start).
    pub orphaned: Orphaned,
    /// `SKALD_SERVICE_DATABASES`: where participant services keep their own
    /// databases (`service=postgres://…`, comma-separated), so the API and dashboard
    /// can show, replay and discard the services' dead letters (default: none).
    pub service_databases: Vec<ServiceDatabase>,
    /// `SKALD_BATCH_MAX` (1 to 64, default 32) and `SKALD_BATCH_WINDOW_MS` (0 to 1000,
    /// default 2): steps of different aggregates committed in one transaction at most,
    /// and how long an open batch waits for more while other steps are in flight.
    pub batching: crate::engine::BatchConfig,
    /// `SKALD_QUEUE_TYPE`: the type of every RabbitMQ queue skald declares (default
    /// `classic`; `quorum` for a cluster).
    pub queue_type: QueueType,
    /// `SKALD_DELIVERY_LIMIT`: with quorum queues, how many times the broker delivers
    /// one partition message before it dead-letters it to `NS.dead` (default 20, 1 to
    /// 1000000).
    pub delivery_limit: u32,
}

/// One participant service's database, from `SKALD_SERVICE_DATABASES`.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceDatabase {
    /// The service's name (as in its command steps and its queues).
    pub service: String,
    /// Its PostgreSQL URL.
    pub url: String,
}

impl std::fmt::Debug for ServiceDatabase {
    // The URL may carry a password: never in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.service, redact_password(&self.url))
    }
}

/// The longest service name `SKALD_SERVICE_DATABASES` accepts (the participant
/// library's limit).
pub const MAX_SERVICE_NAME: usize = 64;

/// Reads `SKALD_SERVICE_DATABASES`: `service=url` entries separated by commas
/// (whitespace around an entry ignored). A name is 1 to 64 of `[A-Za-z0-9_-]` and
/// appears once; a URL is a `postgres://` or `postgresql://` URL. The error names the
/// entry (its password masked) and what is wrong with it.
pub fn parse_service_databases(value: &str) -> Result<Vec<ServiceDatabase>, (String, String)> {
    let mut all: Vec<ServiceDatabase> = Vec::new();
    if value.trim().is_empty() {
        return Ok(all);
    }
    for entry in value.split(',').map(str::trim) {
        let shown = redact_password(entry);
        let refuse = |reason: String| Err((shown.clone(), reason));
        let Some((service, url)) = entry.split_once('=') else {
            return refuse("an entry must be service=postgres://… (no `=` found)".into());
        };
        let (service, url) = (service.trim(), url.trim());
        let name_ok = !service.is_empty()
            && service.len() <= MAX_SERVICE_NAME
            && service
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if !name_ok {
            return refuse(format!(
                "service name {service:?} must be 1 to {MAX_SERVICE_NAME} of [A-Za-z0-9_-]"
            ));
        }
        if all.iter().any(|d| d.service == service) {
            return refuse(format!("service {service:?} is named twice"));
        }
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return refuse(format!(
                "the URL of {service:?} must start with postgres:// or postgresql://"
            ));
        }
        if let Err(e) = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(url) {
            return refuse(format!("the URL of {service:?} does not parse: {e}"));
        }
        all.push(ServiceDatabase {
            service: service.to_string(),
            url: url.to_string(),
        });
    }
    Ok(all)
}

/// `text` with the password of any `scheme://user:password@host` masked as `***`.
pub fn redact_password(text: &str) -> String {
    let Some((head, rest)) = text.split_once("://") else {
        return text.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{head}://{user}:***@{host}{tail}"),
            None => text.to_string(),
        },
        None => text.to_string(),
    }
}

/// How many Redis replicas must have a write before skald counts it as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RedisWait {
    /// `SKALD_REDIS_WAIT_REPLICAS` (default 0: no `WAIT`, the primary's reply is
    /// enough).
    pub replicas: u16,
    /// `SKALD_REDIS_WAIT_MS` (default 1000, at least 1): how long one write waits for
    /// them; fewer replicas by then make the write fail (never counted as done).
    pub timeout: Duration,
}

impl RedisWait {
    /// Whether writes wait for replicas at all.
    pub fn enabled(&self) -> bool {
        self.replicas > 0
    }
}

/// A configuration variable that is set but unusable.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}={value:?} is invalid: {reason}")]
pub struct ConfigError {
    name: &'static str,
    value: String,
    reason: String,
}

/// The queue skald's messages travel on (`SKALD_TRANSPORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// RabbitMQ at `AMQP_URL`.
    RabbitMq,
    /// Tables in skald's own PostgreSQL database (`DATABASE_URL`): no broker.
    #[default]
    Postgres,
    /// Redis Streams at `REDIS_URL`.
    Redis,
}

impl TransportKind {
    /// Every value `SKALD_TRANSPORT` accepts, as spelled there.
    pub const ALL: &[TransportKind] = &[
        TransportKind::RabbitMq,
        TransportKind::Postgres,
        TransportKind::Redis,
    ];

    /// The name `SKALD_TRANSPORT` (and `skald bench --json`) spells it with.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::RabbitMq => "rabbitmq",
            TransportKind::Postgres => "postgres",
            TransportKind::Redis => "redis",
        }
    }

    /// The server's name, for messages.
    pub fn server(self) -> &'static str {
        match self {
            TransportKind::RabbitMq => "RabbitMQ",
            TransportKind::Postgres => "PostgreSQL",
            TransportKind::Redis => "Redis",
        }
    }

    /// The transport named `s`, if there is one.
    pub fn parse(s: &str) -> Option<TransportKind> {
        Self::ALL.iter().copied().find(|k| k.as_str() == s)
    }
}

/// What `skald run` does with live instances of a saga version that is no longer
/// loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Orphaned {
    /// Refuse to start, naming saga, version and count.
    #[default]
    Refuse,
    /// Park them (status `failed`, a dead letter `orphaned_version`) and start: replay
    /// them once their version is loaded again.
    Park,
}

impl Orphaned {
    /// `refuse` or `park`, as `SKALD_ORPHANED` spells it.
    pub fn parse(s: &str) -> Option<Orphaned> {
        match s {
            "refuse" => Some(Orphaned::Refuse),
            "park" => Some(Orphaned::Park),
            _ => None,
        }
    }
}

/// The type of the RabbitMQ queues skald declares (`SKALD_QUEUE_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QueueType {
    /// Classic queues: on one node, not replicated (the default: what every
    /// deployment before quorum support declared, so an upgrade changes nothing).
    #[default]
    Classic,
    /// Quorum queues: replicated over the cluster's nodes (Raft), surviving the loss
    /// of a minority of them.
    Quorum,
}

impl QueueType {
    /// `classic` or `quorum`, as `SKALD_QUEUE_TYPE` spells it.
    pub fn parse(s: &str) -> Option<QueueType> {
        match s {
            "classic" => Some(QueueType::Classic),
            "quorum" => Some(QueueType::Quorum),
            _ => None,
        }
    }

    /// Its name in `SKALD_QUEUE_TYPE` (and RabbitMQ's `x-queue-type`).
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// The database used when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/skald";
/// The broker used when `AMQP_URL` is not set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The Redis server used when `REDIS_URL` is not set.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let text = |name: &str, default: &str| lookup(name).unwrap_or_else(|| default.to_string());
        fn number<T: std::str::FromStr>(
            lookup: &impl Fn(&str) -> Option<String>,
            name: &'static str,
            default: T,
        ) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            match lookup(name) {
                None => Ok(default),
                Some(value) => value.parse().map_err(|e: T::Err| ConfigError {
                    name,
                    reason: e.to_string(),
                    value,
                }),
            }
        }
        let namespace = text("SKALD_NAMESPACE", "skald");
        if namespace.is_empty() || namespace.len() > 100 {
            return Err(ConfigError {
                name: "SKALD_NAMESPACE",
                value: namespace,
                reason: "must be 1 to 100 characters".into(),
            });
        }
        let prefetch: u16 = number(&lookup, "SKALD_PREFETCH", 256)?;
        if prefetch == 0 {
            return Err(ConfigError {
                name: "SKALD_PREFETCH",
                value: "0".into(),
                reason: "0 would mean unbounded".into(),
            });
        }
        let partitions: u16 = number(&lookup, "SKALD_PARTITIONS", 8)?;
        if partitions == 0 || partitions > 1024 {
            return Err(ConfigError {
                name: "SKALD_PARTITIONS",
                value: partitions.to_string(),
                reason: "must be 1 to 1024".into(),
            });
        }
        let http_addr = text("SKALD_HTTP_ADDR", "127.0.0.1:8080");
        let http_addr = http_addr
            .parse()
            .map_err(|e: std::net::AddrParseError| ConfigError {
                name: "SKALD_HTTP_ADDR",
                reason: e.to_string(),
                value: http_addr,
            })?;
        // One of a few names: the default when unset.
        fn choice<T: Default>(
            lookup: &impl Fn(&str) -> Option<String>,
            name: &'static str,
            parse: fn(&str) -> Option<T>,
            reason: &str,
        ) -> Result<T, ConfigError> {
            match lookup(name) {
                None => Ok(T::default()),
                Some(value) => parse(&value).ok_or_else(|| ConfigError {
                    name,
                    value,
                    reason: reason.into(),
                }),
            }
        }
        let orphaned = choice(
            &lookup,
            "SKALD_ORPHANED",
            Orphaned::parse,
            "must be refuse or park",
        )?;
        let transport_names = TransportKind::ALL
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let transport = choice(
            &lookup,
            "SKALD_TRANSPORT",
            TransportKind::parse,
            &format!("must be one of {transport_names}"),
        )?;
        let redis_url = text("REDIS_URL", DEFAULT_REDIS_URL);
        if let Err(e) = redis::Client::open(redis_url.as_str()) {
            return Err(ConfigError {
                name: "REDIS_URL",
                value: redis_url,
                reason: format!(
                    "not a Redis URL (redis://[[user]:password@]host[:port][/db]): {e}"
                ),
            });
        }
        let batch_max: usize =
            number(&lookup, "SKALD_BATCH_MAX", crate::engine::DEFAULT_BATCH_MAX)?;
        if !(1..=crate::engine::MAX_BATCH_MAX).contains(&batch_max) {
            return Err(ConfigError {
                name: "SKALD_BATCH_MAX",
                value: batch_max.to_string(),
                reason: format!("must be 1 to {}", crate::engine::MAX_BATCH_MAX),
            });
        }
        let batch_window: u64 = number(
            &lookup,
            "SKALD_BATCH_WINDOW_MS",
            crate::engine::DEFAULT_BATCH_WINDOW.as_millis() as u64,
        )?;
        if batch_window > 1_000 {
            return Err(ConfigError {
                name: "SKALD_BATCH_WINDOW_MS",
                value: batch_window.to_string(),
                reason: "must be 0 to 1000".into(),
            });
        }
        let queue_type = choice(
            &lookup,
            "SKALD_QUEUE_TYPE",
            QueueType::parse,
            "must be classic or quorum",
        )?;
        let delivery_limit: u32 = number(&lookup, "SKALD_DELIVERY_LIMIT", 20)?;
        if !(1..=1_000_000).contains(&delivery_limit) {
            return Err(ConfigError {
                name: "SKALD_DELIVERY_LIMIT",
                value: delivery_limit.to_string(),
                reason: "must be 1 to 1000000".into(),
            });
        }
        let amqp_url = text("AMQP_URL", DEFAULT_AMQP_URL);
        if let Err(reason) = crate::transport::rabbitmq::brokers::addresses(&amqp_url) {
            return Err(ConfigError {
                name: "AMQP_URL",
                value: amqp_url,
                reason,
            });
        }
        let redis_lease: u64 = number(&lookup, "SKALD_REDIS_LEASE_MS", 10_000)?;
        if redis_lease < 300 {
            return Err(ConfigError {
                name: "SKALD_REDIS_LEASE_MS",
                value: redis_lease.to_string(),
                reason: "must be at least 300".into(),
            });
        }
        let wait_ms: u64 = number(&lookup, "SKALD_REDIS_WAIT_MS", 1_000)?;
        if wait_ms == 0 {
            return Err(ConfigError {
                name: "SKALD_REDIS_WAIT_MS",
                value: "0".into(),
                reason: "must be at least 1 (0 would wait without end)".into(),
            });
        }
        let redis_wait = RedisWait {
            replicas: number(&lookup, "SKALD_REDIS_WAIT_REPLICAS", 0)?,
            timeout: Duration::from_millis(wait_ms),
        };
        let service_databases = match lookup("SKALD_SERVICE_DATABASES") {
            None => Vec::new(),
            Some(value) => {
                parse_service_databases(&value).map_err(|(entry, reason)| ConfigError {
                    name: "SKALD_SERVICE_DATABASES",
                    value: entry,
                    reason,
                })?
            }
        };
        Ok(Config {
            service_databases,
            batching: crate::engine::BatchConfig {
                max: batch_max,
                window: Duration::from_millis(batch_window),
            },
            orphaned,
            redis_wait,
            transport,
            redis_url,
            redis_lease: Duration::from_millis(redis_lease),
            startup_timeout: Duration::from_millis(number(
                &lookup,
                "SKALD_STARTUP_TIMEOUT_MS",
                60_000,
            )?),
            subscribe_stagger: Duration::from_millis(number(
                &lookup,
                "SKALD_SUBSCRIBE_STAGGER_MS",
                250,
            )?),
            http_addr,
            api_token: lookup("SKALD_API_TOKEN").filter(|t| !t.is_empty()),
            partitions,
            database_url: text("DATABASE_URL", DEFAULT_DATABASE_URL),
            amqp_url,
            queue_type,
            delivery_limit,
            sagas_dir: PathBuf::from(text("SKALD_SAGAS_DIR", "sagas")),
            namespace,
            prefetch,
            db_pool: number(&lookup, "SKALD_DB_POOL", 16)?,
            actor_idle: Duration::from_millis(number(&lookup, "SKALD_ACTOR_IDLE_MS", 30_000)?),
            shutdown_timeout: Duration::from_millis(number(
                &lookup,
                "SKALD_SHUTDOWN_TIMEOUT_MS",
                30_000,
            )?),
            stuck_after: Duration::from_millis(number(&lookup, "SKALD_STUCK_AFTER_MS", 60_000)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_point_at_local_services() {
        let c = with(&[]).unwrap();
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(c.amqp_url, DEFAULT_AMQP_URL);
        assert_eq!(c.namespace, "skald");
        assert_eq!(c.prefetch, 256);
        assert_eq!(c.transport, TransportKind::Postgres);
        assert_eq!(c.redis_url, DEFAULT_REDIS_URL);
        assert_eq!(c.redis_lease, Duration::from_secs(10));
        assert!(!c.redis_wait.enabled());
        assert_eq!(c.redis_wait.timeout, Duration::from_secs(1));
    }

    #[test]
    fn the_transport_is_chosen_by_name() {
        let c = with(&[("SKALD_TRANSPORT", "redis"), ("REDIS_URL", "redis://r:1")]).unwrap();
        assert_eq!(
            (c.transport, c.redis_url.as_str()),
            (TransportKind::Redis, "redis://r:1")
        );
        let err = with(&[("SKALD_TRANSPORT", "kafka")]).unwrap_err();
        assert!(err.to_string().contains("SKALD_TRANSPORT"), "{err}");
        let err = with(&[("REDIS_URL", "localhost:6379")]).unwrap_err();
        assert!(err.to_string().contains("REDIS_URL"), "{err}");
        let err = with(&[("SKALD_REDIS_LEASE_MS", "100")]).unwrap_err();
        assert!(err.to_string().contains("at least 300"), "{err}");
    }

    #[test]
    fn redis_writes_wait_for_replicas_only_when_asked() {
        let c = with(&[
            ("SKALD_REDIS_WAIT_REPLICAS", "2"),
            ("SKALD_REDIS_WAIT_MS", "250"),
        ])
        .unwrap();
        assert!(c.redis_wait.enabled());
        assert_eq!(
            c.redis_wait,
            RedisWait {
                replicas: 2,
                timeout: Duration::from_millis(250)
            }
        );
        let err = with(&[("SKALD_REDIS_WAIT_MS", "0")]).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
        let err = with(&[("SKALD_REDIS_WAIT_REPLICAS", "-1")]).unwrap_err();
        assert!(
            err.to_string().contains("SKALD_REDIS_WAIT_REPLICAS"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = with(&[("SKALD_PREFETCH", "lots")]).unwrap_err();
        assert!(err.to_string().contains("SKALD_PREFETCH"), "{err}");
        assert!(with(&[("SKALD_PREFETCH", "0")]).is_err());
        assert!(with(&[("SKALD_NAMESPACE", "")]).is_err());
        let err = with(&[("SKALD_ORPHANED", "drop")]).unwrap_err();
        assert!(err.to_string().contains("SKALD_ORPHANED"), "{err}");
    }

    #[test]
    fn the_transport_is_chosen_by_name_and_an_unknown_one_is_refused() {
        assert_eq!(with(&[]).unwrap().transport, TransportKind::Postgres);
        assert_eq!(
            with(&[("SKALD_TRANSPORT", "postgres")]).unwrap().transport,
            TransportKind::Postgres
        );
        assert_eq!(
            with(&[("SKALD_TRANSPORT", "rabbitmq")]).unwrap().transport,
            TransportKind::RabbitMq
        );
        let err = with(&[("SKALD_TRANSPORT", "kafka")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable SKALD_TRANSPORT=\"kafka\" is invalid: must be one of rabbitmq, postgres, redis"
        );
    }

    #[test]
    fn orphaned_instances_are_refused_unless_told_to_park() {
        assert_eq!(with(&[]).unwrap().orphaned, Orphaned::Refuse);
        assert_eq!(
            with(&[("SKALD_ORPHANED", "park")]).unwrap().orphaned,
            Orphaned::Park
        );
        assert_eq!(
            with(&[("SKALD_ORPHANED", "refuse")]).unwrap().orphaned,
            Orphaned::Refuse
        );
    }

    #[test]
    fn service_databases_are_named_urls_and_bad_entries_are_named() {
        assert!(with(&[]).unwrap().service_databases.is_empty());
        let c = with(&[(
            "SKALD_SERVICE_DATABASES",
            " stock=postgres://u@h/stock , payments=postgresql://u:secret@h:5433/pay",
        )])
        .unwrap();
        let pairs: Vec<(&str, &str)> = c
            .service_databases
            .iter()
            .map(|d| (d.service.as_str(), d.url.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("stock", "postgres://u@h/stock"),
                ("payments", "postgresql://u:secret@h:5433/pay")
            ]
        );
        assert!(!format!("{c:?}").contains("secret"));
        for (bad, says) in [
            ("stock", "no `=` found"),
            ("=postgres://h/x", "service name \"\""),
            ("st ock=postgres://h/x", "[A-Za-z0-9_-]"),
            ("a=postgres://h/a,a=postgres://h/b", "named twice"),
            ("stock=mysql://h/x", "must start with postgres://"),
            ("stock=postgres://h/x,", "no `=` found"),
            ("stock=postgres://h:port/x", "does not parse"),
        ] {
            let err = with(&[("SKALD_SERVICE_DATABASES", bad)])
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("environment variable SKALD_SERVICE_DATABASES="),
                "{err}"
            );
            assert!(err.contains(says), "{bad}: {err}");
        }
        let err = with(&[("SKALD_SERVICE_DATABASES", "s=mysql://u:hunter2@h/x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("u:***@h") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn batching_defaults_and_limits() {
        let c = with(&[]).unwrap();
        assert_eq!(c.batching.max, 32);
        assert_eq!(c.batching.window, Duration::from_millis(2));
        let c = with(&[("SKALD_BATCH_MAX", "1"), ("SKALD_BATCH_WINDOW_MS", "0")]).unwrap();
        assert_eq!((c.batching.max, c.batching.window), (1, Duration::ZERO));
        assert_eq!(
            with(&[("SKALD_BATCH_MAX", "65")]).unwrap_err().to_string(),
            "environment variable SKALD_BATCH_MAX=\"65\" is invalid: must be 1 to 64"
        );
        assert!(with(&[("SKALD_BATCH_MAX", "0")]).is_err());
        assert_eq!(
            with(&[("SKALD_BATCH_WINDOW_MS", "1001")])
                .unwrap_err()
                .to_string(),
            "environment variable SKALD_BATCH_WINDOW_MS=\"1001\" is invalid: must be 0 to 1000"
        );
        assert!(with(&[("SKALD_BATCH_WINDOW_MS", "soon")]).is_err());
    }

    #[test]
    fn queues_are_classic_unless_told_quorum() {
        let c = with(&[]).unwrap();
        assert_eq!((c.queue_type, c.delivery_limit), (QueueType::Classic, 20));
        let c = with(&[
            ("SKALD_QUEUE_TYPE", "quorum"),
            ("SKALD_DELIVERY_LIMIT", "5"),
        ])
        .unwrap();
        assert_eq!((c.queue_type, c.delivery_limit), (QueueType::Quorum, 5));
        let err = with(&[("SKALD_QUEUE_TYPE", "stream")]).unwrap_err();
        assert!(err.to_string().contains("classic or quorum"), "{err}");
        assert!(with(&[("SKALD_DELIVERY_LIMIT", "0")]).is_err());
        assert!(with(&[("SKALD_DELIVERY_LIMIT", "1000001")]).is_err());
    }

    #[test]
    fn several_broker_addresses_are_one_comma_separated_amqp_url() {
        let list = "amqp://a:5672/%2f, amqp://b:5672/%2f";
        assert_eq!(with(&[("AMQP_URL", list)]).unwrap().amqp_url, list);
        let err = with(&[("AMQP_URL", "amqp://a:5672,http://b")]).unwrap_err();
        assert!(err.to_string().contains("AMQP_URL"), "{err}");
    }
}
