"""A real single-node Apache Kafka broker (KRaft: broker and controller in one JVM) for the tests.

The jars come from ``make kafka`` (tests/kafka/pom.xml → ``~/.cache/recops/kafka-VERSION/libs``, or
``$RECOPS_KAFKA_LIBS``). :class:`KafkaBroker` formats storage in a temporary folder, starts the broker on
free 127.0.0.1 ports, waits until it answers Kafka requests, and can be stopped and started again on the
same ports and data (to test clients riding out a broker restart).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POM = REPO / "tests" / "kafka" / "pom.xml"


def kafka_version() -> str:
    """The broker version: the single source is tests/kafka/pom.xml (the Makefile reads it too)."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    assert match, f"{POM}: no <kafka.version>"
    return match.group(1)


def kafka_libs() -> Path | None:
    """The folder of broker jars, or None when ``make kafka`` has not run (or java is missing)."""
    default = Path.home() / ".cache" / "recops" / f"kafka-{kafka_version()}" / "libs"
    libs = Path(os.environ.get("RECOPS_KAFKA_LIBS", default))
    if not any(libs.glob("kafka_2.13-*.jar")) or shutil.which("java") is None:
        return None
    return libs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class KafkaBroker:
    """One KRaft broker+controller process on loopback; ``bootstrap`` is its ``host:port``."""

    def __init__(self, libs: Path, folder: Path, *, partitions: int = 3) -> None:
        self.libs = libs
        self.folder = folder
        self.port = _free_port()
        self.controller_port = _free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "broker.log"
        self.startup_seconds: list[float] = []  # one entry per start, for the test report
        data = folder / "data"
        self.properties = folder / "server.properties"
        # Tuned for a 2-core CI box: one node, replication 1, no rebalance delay, small thread pools.
        self.properties.write_text("\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={data}",
            f"num.partitions={partitions}",
            "auto.create.topics.enable=true",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "min.insync.replicas=1",
            "group.initial.rebalance.delay.ms=0",
            "num.network.threads=2",
            "num.io.threads=2",
            "num.recovery.threads.per.data.dir=1",
            "background.threads=2",
            "log.flush.interval.messages=1",  # the broker fsyncs each write: an ack means on disk
            "",
        ]))
        (folder / "log4j2.properties").write_text("\n".join([
            "rootLogger.level=INFO",
            "rootLogger.appenderRef.out.ref=out",
            "appender.out.type=Console",
            "appender.out.name=out",
            "appender.out.layout.type=PatternLayout",
            "appender.out.layout.pattern=[%d] %p %m (%c)%n",
            "",
        ]))
        self._format()

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            "java", "-Xms64m", "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xshare:auto",
            "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={self.folder / 'log4j2.properties'}",
            "-cp", f"{self.libs}/*", main, *args,
        ]

    def _format(self) -> None:
        # Kafka's cluster ids: 16 random bytes in url-safe base64, no padding; one starting with "-" would be
        # read as an option by kafka-storage's argument parser, so draw again.
        cid = "-"
        while cid.startswith("-"):
            cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # Static voters (controller.quorum.voters): the simplest quorum for one node; no --standalone then.
        result = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "--config", str(self.properties),
                       "--cluster-id", cid, "--ignore-formatted"),
            capture_output=True, text=True, timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"kafka-storage format failed:\n{result.stdout}\n{result.stderr}")

    def start(self, timeout: float = 90.0) -> KafkaBroker:
        """Start the broker and wait until it serves metadata (a client sees the node)."""
        assert self.process is None, "already running"
        started = time.monotonic()
        out = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self._java("kafka.Kafka", str(self.properties)), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        deadline = started + timeout
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"the Kafka broker exited ({self.process.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Kafka broker was not ready in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)
        self.startup_seconds.append(time.monotonic() - started)
        return self

    def _ready(self) -> bool:
        # The log line is the cheapest readiness signal: "[KafkaRaftServer nodeId=1] Kafka Server started".
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        return text.count("Kafka Server started") >= len(self.startup_seconds) + 1

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it does not exit in time."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no broker log)"
