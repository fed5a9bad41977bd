//! Apache Kafka for tests: the broker of the test run (`ORDERLINE_TEST_KAFKA_BROKERS`, which
//! `scripts/ensure-kafka` starts), and [`Cluster`], three KRaft nodes of a test's own on ports of
//! their own, for the tests that kill, freeze and restart brokers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::ClientConfig;

use crate::process::free_port;

/// The broker of the test run.
///
/// # Panics
/// When `ORDERLINE_TEST_KAFKA_BROKERS` is unset (run the tests with `scripts/test`).
pub fn brokers() -> String {
    std::env::var("ORDERLINE_TEST_KAFKA_BROKERS")
        .expect("ORDERLINE_TEST_KAFKA_BROKERS: run the tests with scripts/test, which starts Kafka")
}

/// Where `scripts/ensure-kafka` installed Apache Kafka (installing it if needed): its `libs/`
/// and `log4j2.yaml`.
///
/// # Panics
/// When the script fails.
pub fn home() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ensure-kafka");
    let out = Command::new(script)
        .arg("--home")
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/ensure-kafka --home");
    assert!(out.status.success(), "scripts/ensure-kafka --home failed");
    let text = String::from_utf8(out.stdout).expect("a path");
    PathBuf::from(text.lines().last().expect("the installation folder").trim())
}

/// One node of a [`Cluster`]: a broker and a controller in one process.
struct Node {
    id: u32,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

/// A cluster of KRaft nodes (one at a time per test binary), each broker and controller at once, replicating every topic three
/// times with `min.insync.replicas=2` by default, in a temporary folder removed (and every node
/// killed) when dropped. Brokers are told of a dead peer within a few seconds
/// (`broker.session.timeout.ms=3000`), so a killed leader is replaced quickly.
pub struct Cluster {
    home: PathBuf,
    root: PathBuf,
    nodes: Vec<Node>,
    /// One cluster at a time in a test binary: each node is a JVM, and tests run in parallel.
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

/// Whose turn it is to run a cluster in this test binary.
static TURN: std::sync::LazyLock<std::sync::Arc<tokio::sync::Mutex<()>>> =
    std::sync::LazyLock::new(|| std::sync::Arc::new(tokio::sync::Mutex::new(())));

impl Cluster {
    /// Formats and starts `size` nodes and waits until every broker is in the cluster's metadata.
    ///
    /// # Panics
    /// When a node does not come up within 60 s.
    pub async fn start(size: u32) -> Self {
        let turn = TURN.clone().lock_owned().await;
        let home = tokio::task::spawn_blocking(home).await.expect("find Kafka");
        let root = std::env::temp_dir().join(format!(
            "orderline-kafka-cluster-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let voters: Vec<String> = ports
            .iter()
            .zip(1..)
            .map(|((_, controller), id)| format!("{id}@127.0.0.1:{controller}"))
            .collect();
        let replicas = size.min(3);
        let min_isr = replicas.min(2);
        let mut nodes = Vec::new();
        for (id, (port, controller)) in (1..).zip(ports) {
            let dir = root.join(format!("node{id}"));
            std::fs::create_dir_all(dir.join("data")).expect("node folder");
            let config = format!(
                "process.roles=broker,controller
node.id={id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={data}
num.partitions=1
default.replication.factor={replicas}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={replicas}
offsets.topic.num.partitions=4
transaction.state.log.replication.factor={replicas}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
unclean.leader.election.enable=false
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
",
                voters = voters.join(","),
                data = dir.join("data").display(),
            );
            std::fs::write(dir.join("server.properties"), config).expect("node config");
            nodes.push(Node {
                id,
                port,
                dir,
                child: None,
                starts: 0,
            });
        }
        let mut cluster = Self {
            home,
            root,
            nodes,
            _turn: turn,
        };
        let cluster_id = cluster.tool_output(&["kafka.tools.StorageTool", "random-uuid"]);
        for node in &cluster.nodes {
            let config = node.dir.join("server.properties");
            let config = config.to_str().expect("a UTF-8 path");
            cluster.tool_output(&[
                "kafka.tools.StorageTool",
                "format",
                "--config",
                config,
                "--cluster-id",
                cluster_id.trim(),
            ]);
        }
        for id in 1..=size {
            cluster.spawn(id);
        }
        for id in 1..=size {
            cluster.wait_started(id).await;
        }
        cluster.wait_brokers(size).await;
        cluster
    }

    /// The bootstrap servers of every node.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node that leads `partition` of `topic` now.
    ///
    /// # Panics
    /// When the metadata cannot be read or names no leader.
    pub async fn leader(&self, topic: &str, partition: i32) -> u32 {
        let bootstrap = self.bootstrap();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let metadata = metadata_client(&bootstrap)
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .expect("cluster metadata");
            let leader = metadata.topics()[0]
                .partitions()
                .iter()
                .find(|p| p.id() == partition)
                .map(rdkafka::metadata::MetadataPartition::leader)
                .expect("the partition");
            u32::try_from(leader).expect("a leader")
        })
        .await
        .expect("read the leader")
    }

    /// Kills node `id` at once (`kill -9`): no flush, no controlled shutdown.
    ///
    /// # Panics
    /// When the node is not running.
    pub fn kill(&mut self, id: u32) {
        let node = self.node(id);
        let mut child = node.child.take().expect("the node is running");
        child.kill().expect("kill the node");
        child.wait().expect("reap the node");
    }

    /// Freezes node `id` (`SIGSTOP`) until [`Cluster::resume`].
    pub fn freeze(&self, id: u32) {
        self.signal(id, "-STOP");
    }

    /// Lets a frozen node go on (`SIGCONT`).
    pub fn resume(&self, id: u32) {
        self.signal(id, "-CONT");
    }

    /// Starts a killed node again on its storage and waits until it runs.
    ///
    /// # Panics
    /// When it does not come up within 60 s.
    pub async fn restart(&mut self, id: u32) {
        self.spawn(id);
        self.wait_started(id).await;
        self.wait_brokers(u32::try_from(self.nodes.len()).unwrap_or(u32::MAX))
            .await;
    }

    fn node(&mut self, id: u32) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .expect("a node of this cluster")
    }

    fn signal(&self, id: u32, signal: &str) {
        let node = self
            .nodes
            .iter()
            .find(|n| n.id == id)
            .expect("a node of this cluster");
        let pid = node.child.as_ref().expect("the node is running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("send a signal");
        assert!(status.success(), "kill {signal} {pid}");
    }

    fn java(&self) -> Command {
        let mut command = Command::new("java");
        command.arg(format!(
            "-Dlog4j2.configurationFile={}",
            self.home.join("log4j2.yaml").display()
        ));
        command.arg("-cp").arg(self.home.join("libs/*"));
        command
    }

    /// Runs one of Kafka's tools by class name and answers its standard output.
    fn tool_output(&self, args: &[&str]) -> String {
        let out = self
            .java()
            .arg("-Xmx256m")
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .expect("run a Kafka tool");
        assert!(out.status.success(), "{args:?} failed");
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    fn spawn(&mut self, id: u32) {
        let mut command = self.java();
        let node = self.node(id);
        node.starts += 1;
        let log = std::fs::File::create(node.dir.join(format!("broker-{}.log", node.starts)))
            .expect("node log");
        let child = command
            .args(["-Xms128m", "-Xmx384m", "-XX:+UseSerialGC", "kafka.Kafka"])
            .arg(node.dir.join("server.properties"))
            .stdout(log.try_clone().expect("node log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start a Kafka node");
        self.node(id).child = Some(child);
    }

    async fn wait_started(&mut self, id: u32) {
        let started = Instant::now();
        loop {
            let node = self.node(id);
            let log = node.dir.join(format!("broker-{}.log", node.starts));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Kafka Server started") {
                return;
            }
            let exited = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(exited.is_none(), "Kafka node {id} exited: {text}");
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "Kafka node {id} did not start: {text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_brokers(&self, size: u32) {
        let bootstrap = self.bootstrap();
        let started = Instant::now();
        loop {
            let bootstrap = bootstrap.clone();
            let brokers = tokio::task::spawn_blocking(move || {
                metadata_client(&bootstrap)
                    .fetch_metadata(None, Duration::from_secs(5))
                    .map(|m| m.brokers().len())
                    .unwrap_or(0)
            })
            .await
            .unwrap_or(0);
            if brokers == size as usize {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the cluster shows {brokers} of {size} brokers"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn metadata_client(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .create()
        .expect("a Kafka client")
}
