#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft, broker+controller in one JVM) on loopback,
# for tests, demos and CI on machines without a docker engine.
#
# Usage: docker/local/kafka.sh start|stop|restart|status|tool <main-class> [args...]
#
#   start    fetch Kafka jars via Maven (once, cached), format storage (once per data
#            dir), start the broker in the background and wait until it serves requests.
#            The LAST line of stdout is the bootstrap address, everything else goes to
#            stderr:   BOOT=$(docker/local/kafka.sh start | tail -1)
#   stop     SIGTERM (bounded wait), then SIGKILL. KAFKA_WIPE=1 also deletes the data dir.
#   restart  stop (never wipes) + start: simulates a broker restart with data kept.
#   status   prints "running <addr> (pid N)" / "stopped"; exit 0 / 1.
#   tool     run any Kafka CLI class with the cached classpath, e.g.
#            docker/local/kafka.sh tool org.apache.kafka.tools.TopicCommand \
#              --bootstrap-server 127.0.0.1:9092 --list
#
# Environment:
#   KAFKA_BOOTSTRAP_SERVERS  if set, `start` only prints it (use your own broker).
#   KAFKA_VERSION            org.apache.kafka:kafka_2.13 version (default below).
#   KAFKA_PORT               PLAINTEXT port (9092); KAFKA_CONTROLLER_PORT (KAFKA_PORT+1).
#   KAFKA_HEAP_OPTS          JVM heap flags (-Xmx512m -Xms256m); KAFKA_OPTS extra JVM flags.
#   KAFKA_START_TIMEOUT      seconds to wait for readiness (90).
#   KAFKA_WIPE=1             with `stop`: delete the data dir afterwards.
#   KAFKA_SASL=1             also open a SASL_PLAINTEXT listener on KAFKA_SASL_PORT
#                            (KAFKA_PORT+2) accepting PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512
#                            for one user, KAFKA_SASL_USER / KAFKA_SASL_PASSWORD
#                            (rcworker / rcworker-secret). SCRAM credentials are written when
#                            the data dir is formatted, so a data dir first started without
#                            SASL must be wiped (KAFKA_WIPE=1 ... stop) before SASL works.
#                            The last stdout line stays the PLAINTEXT address; the SASL one
#                            is 127.0.0.1:$KAFKA_SASL_PORT.
#   RC_WORKER_CACHE          cache root (~/.cache/rc-apps-worker); jars live in
#                            $RC_WORKER_CACHE/kafka-$KAFKA_VERSION/libs, data and logs in
#                            $RC_WORKER_CACHE/kafka-data-$KAFKA_PORT.
#   MVN, MVN_ARGS            maven binary and extra flags (e.g. -Dmaven.repo.local=...).
#   JAVA_HOME / JAVA         Java 17+ runtime.
set -euo pipefail

# Newest 4.x on Maven Central when this was written; every 4.x resolves the same way.
KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
# Kafka's poms bring log4j-api/core only transitively and no SLF4J binding at all (the
# binary tarball bundles log4j-slf4j-impl).  Without a binding the broker logs nothing,
# which makes startup failures impossible to diagnose, so we add the binding ourselves
# and pin the whole log4j2 family to one version to avoid api/core/binding skew.
LOG4J_VERSION="${KAFKA_LOG4J_VERSION:-2.25.5}"
# Pinned so the download does not depend on whatever "latest" plugin Maven would pick.
DEP_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

KAFKA_HOST=127.0.0.1 # loopback only: a test broker must never be reachable from outside
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
# 1 GiB: a broker that has seen a long test history holds thousands of partitions.
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1g -Xms256m}"
KAFKA_OPTS="${KAFKA_OPTS:-}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
BOOTSTRAP="$KAFKA_HOST:$KAFKA_PORT"
KAFKA_SASL="${KAFKA_SASL:-0}"
KAFKA_SASL_PORT="${KAFKA_SASL_PORT:-$((KAFKA_PORT + 2))}"
KAFKA_SASL_USER="${KAFKA_SASL_USER:-rcworker}"
KAFKA_SASL_PASSWORD="${KAFKA_SASL_PASSWORD:-rcworker-secret}"

CACHE="${RC_WORKER_CACHE:-$HOME/.cache/rc-apps-worker}"
DIST_DIR="$CACHE/kafka-$KAFKA_VERSION"
LIBS_DIR="$DIST_DIR/libs"
# Written only after a complete download: a half-filled libs/ (network drop, Ctrl-C)
# must never be mistaken for a usable install.
LIBS_MARKER="$DIST_DIR/.libs-complete"
DATA_DIR="$CACHE/kafka-data-$KAFKA_PORT"
LOG_DIR="$DATA_DIR/logs"
PID_FILE="$DATA_DIR/kafka.pid"
SERVER_PROPS="$DATA_DIR/server.properties"
LOG4J_CONF="$DATA_DIR/log4j2.properties"
TOOLS_LOG4J_CONF="$DATA_DIR/tools-log4j2.properties"
CLIENT_PROPS="$DATA_DIR/client.properties"
# Names the SCRAM user (and a hash of its password) written at format time: SCRAM
# credentials live in the metadata log, so other ones need a freshly formatted data dir.
SCRAM_MARKER="$DATA_DIR/scram-user"

MVN="${MVN:-mvn}"
MVN_ARGS="${MVN_ARGS:-}"
if [[ -n "${JAVA:-}" ]]; then :
elif [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then JAVA="$JAVA_HOME/bin/java"
else JAVA=java; fi

log() { printf '[kafka.sh] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Bash's /dev/tcp avoids depending on nc/ss being installed on CI images.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# A pid file can outlive its process and the pid be reused, so also check that the
# pid is really our broker (its command line names our server.properties).
broker_pid() {
  local pid
  [[ -f "$PID_FILE" ]] || return 1
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "kafka.Kafka $SERVER_PROPS" || return 1
  echo "$pid"
}

require_java() {
  command -v "$JAVA" >/dev/null 2>&1 ||
    die "java not found (Kafka $KAFKA_VERSION needs Java 17+; on Debian: apt-get install -y openjdk-17-jre-headless)"
  local spec
  spec="$("$JAVA" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p' | head -1)"
  [[ "${spec%%.*}" =~ ^[0-9]+$ && "${spec%%.*}" -ge 17 ]] ||
    die "Kafka $KAFKA_VERSION needs Java 17+, but '$JAVA' is version '${spec:-unknown}'"
}

fetch_libs() {
  [[ -f "$LIBS_MARKER" ]] && return 0
  mkdir -p "$DIST_DIR"
  # Brokers on different ports share one jar cache; fetch it only once. The subshell
  # scopes the lock fd (8) so it is released before anything long-lived is started.
  (
    flock -w 900 8 || die "timed out waiting for $DIST_DIR.lock"
    [[ -f "$LIBS_MARKER" ]] || download_libs
  ) 8>"$DIST_DIR.lock"
}

# Resolve the broker, the CLI tools and their runtime dependencies from Maven Central.
# kafka_2.13's own pom is enough to run the broker and kafka.tools.StorageTool;
# kafka-tools adds TopicCommand/ConsoleProducer/ConsoleConsumer (readiness check and
# manual poking).  connect-runtime is excluded: kafka-tools only needs it for the
# connect-plugin-path tool and it would drag in Jetty/Jersey (~30 extra jars).
download_libs() {
  command -v "$MVN" >/dev/null 2>&1 || die "mvn not found (on Debian: apt-get install -y maven)"
  log "fetching Kafka $KAFKA_VERSION + dependencies from Maven Central into $LIBS_DIR (one-off)"
  cat >"$DIST_DIR/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by docker/local/kafka.sh; only used to resolve the Kafka classpath. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.rc-apps-worker</groupId>
  <artifactId>kafka-local-runtime</artifactId>
  <version>$KAFKA_VERSION</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version>
      <exclusions>
        <exclusion><groupId>org.apache.kafka</groupId><artifactId>connect-runtime</artifactId></exclusion>
      </exclusions>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-api</artifactId><version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  local tmp="$DIST_DIR/libs.tmp.$$"
  rm -rf "$tmp"
  # shellcheck disable=SC2086  # MVN_ARGS is a list of flags on purpose
  if ! "$MVN" -B -q -f "$DIST_DIR/pom.xml" $MVN_ARGS \
      "$DEP_PLUGIN:copy-dependencies" -DincludeScope=runtime -DoutputDirectory="$tmp" \
      >"$DIST_DIR/mvn.log" 2>&1; then
    tail -n 50 "$DIST_DIR/mvn.log" >&2 || true
    rm -rf "$tmp"
    die "maven could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION (log: $DIST_DIR/mvn.log)"
  fi
  [[ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] || die "maven finished but kafka_2.13-$KAFKA_VERSION.jar is missing in $tmp"
  rm -rf "$LIBS_DIR"
  mv "$tmp" "$LIBS_DIR"
  touch "$LIBS_MARKER"
  log "fetched $(find "$LIBS_DIR" -name '*.jar' | wc -l) jars"
}

# The extra listener's JAAS settings for KAFKA_SASL=1, appended to server.properties. PLAIN
# checks the user_<name> entry; SCRAM checks the credentials in the metadata log. Brokers
# talk to each other (and tools probe readiness) on PLAINTEXT, so nothing else changes.
sasl_properties() {
  cat <<EOF

# KAFKA_SASL=1: SASL_PLAINTEXT on $KAFKA_HOST:$KAFKA_SASL_PORT for user $KAFKA_SASL_USER.
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$KAFKA_SASL_USER="$KAFKA_SASL_PASSWORD";
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
}

check_sasl_settings() {
  [[ "$KAFKA_SASL" == 1 ]] || return 0
  [[ "$KAFKA_SASL_USER" =~ ^[A-Za-z0-9_.-]+$ ]] ||
    die "KAFKA_SASL_USER must be letters, digits, '_', '.' or '-' (it is part of a JAAS option name)"
  # JAAS and --add-scram quote or split on these; a password holding one would be cut short.
  local allowed='^[^]\",=[:space:]]+$'
  [[ "$KAFKA_SASL_PASSWORD" =~ $allowed ]] ||
    die "KAFKA_SASL_PASSWORD must be non-empty, without spaces and without any of: \\ \" ] , ="
}

write_configs() {
  mkdir -p "$LOG_DIR" "$DATA_DIR/kraft"
  local listeners="PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_CONTROLLER_PORT"
  local advertised="PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT"
  local protocols="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
  if [[ "$KAFKA_SASL" == 1 ]]; then
    listeners+=",SASL_PLAINTEXT://$KAFKA_HOST:$KAFKA_SASL_PORT"
    advertised+=",SASL_PLAINTEXT://$KAFKA_HOST:$KAFKA_SASL_PORT"
    protocols+=",SASL_PLAINTEXT:SASL_PLAINTEXT"
  fi
  # Regenerated on every start so edits to this script / env apply to an existing data dir.
  cat >"$SERVER_PROPS" <<EOF
# Generated by docker/local/kafka.sh - edits are overwritten on the next start.
process.roles=broker,controller
node.id=1
# Static single-voter quorum: works on every Kafka 4.x and needs no --standalone format.
controller.quorum.voters=1@$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
listeners=$listeners
advertised.listeners=$advertised
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$protocols
log.dirs=$DATA_DIR/kraft

# Single node: every internal topic must be satisfiable with one replica.
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer internal partitions = faster first consumer-group / transaction use.
offsets.topic.num.partitions=6
transaction.state.log.num.partitions=6

# Tests: consumers join immediately instead of waiting 3 s for more members, and the
# application must create its own topics (a typo should fail, not auto-create).
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
EOF
  if [[ "$KAFKA_SASL" == 1 ]]; then sasl_properties >>"$SERVER_PROPS"; fi
  cat >"$LOG4J_CONF" <<EOF
# Generated by docker/local/kafka.sh
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $LOG_DIR/server.log
appender.file.filePattern = $LOG_DIR/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
# The request/state-change loggers are extremely chatty at INFO and useless for tests.
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.statechange.name = state.change.logger
logger.statechange.level = warn
EOF
  cat >"$TOOLS_LOG4J_CONF" <<EOF
# Generated by docker/local/kafka.sh - CLI tools: warnings only, to stderr.
status = warn
# Short-lived JVMs: the hook only produces "Unable to register shutdown hook" noise.
shutdownHook = disable
appender.err.type = Console
appender.err.name = err
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.err.ref = err
EOF
  # Short client timeouts so the readiness probe fails fast and is retried by us.
  cat >"$CLIENT_PROPS" <<EOF
request.timeout.ms=5000
default.api.timeout.ms=8000
EOF
}

# Tool JVMs are short-lived: C1 only + serial GC start noticeably faster.
run_tool() {
  "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$TOOLS_LOG4J_CONF" -cp "$LIBS_DIR/*" "$@"
}

format_storage() {
  # meta.properties exists once the log dir has been formatted; formatting again would
  # fail (or, forced, destroy data), and restarts must keep the data.
  if [[ -f "$DATA_DIR/kraft/meta.properties" ]]; then
    if [[ "$KAFKA_SASL" == 1 && "$(cat "$SCRAM_MARKER" 2>/dev/null)" != "$(scram_marker)" ]]; then
      die "KAFKA_SASL=1, but $DATA_DIR was formatted without these SCRAM credentials for '$KAFKA_SASL_USER'; wipe it first: KAFKA_PORT=$KAFKA_PORT KAFKA_WIPE=1 $0 stop"
    fi
    return 0
  fi
  local cluster_id scram=()
  if [[ "$KAFKA_SASL" == 1 ]]; then
    scram=(--add-scram "SCRAM-SHA-256=[name=$KAFKA_SASL_USER,password=$KAFKA_SASL_PASSWORD]"
      --add-scram "SCRAM-SHA-512=[name=$KAFKA_SASL_USER,password=$KAFKA_SASL_PASSWORD]")
  fi
  cluster_id="$(run_tool kafka.tools.StorageTool random-uuid | tail -1)"
  [[ -n "$cluster_id" ]] || die "kafka.tools.StorageTool random-uuid returned nothing"
  log "formatting KRaft storage in $DATA_DIR/kraft (cluster id $cluster_id)"
  run_tool kafka.tools.StorageTool format --ignore-formatted \
    -t "$cluster_id" -c "$SERVER_PROPS" "${scram[@]}" >"$LOG_DIR/format.log" 2>&1 || {
    cat "$LOG_DIR/format.log" >&2
    die "kafka.tools.StorageTool format failed"
  }
  if [[ "$KAFKA_SASL" == 1 ]]; then scram_marker >"$SCRAM_MARKER"; else rm -f "$SCRAM_MARKER"; fi
}

scram_marker() { printf '%s %s\n' "$KAFKA_SASL_USER" "$(printf '%s' "$KAFKA_SASL_PASSWORD" | sha256sum | cut -c1-64)"; }

dump_log() {
  log "last 50 lines of $LOG_DIR/server.log:"
  tail -n 50 "$LOG_DIR/server.log" >&2 2>/dev/null || true
  if [[ -s "$LOG_DIR/kafka.out" ]]; then
    log "last 20 lines of $LOG_DIR/kafka.out (JVM stdout/stderr):"
    tail -n 20 "$LOG_DIR/kafka.out" >&2 || true
  fi
}

wait_ready() {
  local pid="$1" deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  # Cheap phase: the PLAINTEXT acceptor only opens once the broker has caught up with
  # the metadata log, so poll the socket from bash before paying for a JVM probe.
  until port_open "$KAFKA_HOST" "$KAFKA_PORT"; do
    kill -0 "$pid" 2>/dev/null || { dump_log; die "broker process $pid exited during startup"; }
    ((SECONDS < deadline)) || { dump_log; die "broker did not open $BOOTSTRAP within ${KAFKA_START_TIMEOUT}s"; }
    sleep 0.2
  done
  # Real check: a metadata round-trip through the admin client.
  until run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOTSTRAP" \
      --command-config "$CLIENT_PROPS" --list >/dev/null 2>"$LOG_DIR/probe.err"; do
    kill -0 "$pid" 2>/dev/null || { dump_log; die "broker process $pid exited during startup"; }
    ((SECONDS < deadline)) || { cat "$LOG_DIR/probe.err" >&2; dump_log; die "broker on $BOOTSTRAP did not answer requests within ${KAFKA_START_TIMEOUT}s"; }
    sleep 1
  done
}

cmd_start() {
  if [[ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; then
    log "KAFKA_BOOTSTRAP_SERVERS is set; not starting a local broker"
    echo "$KAFKA_BOOTSTRAP_SERVERS"
    return 0
  fi
  local pid
  if pid="$(broker_pid)"; then
    if port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
      log "already running (pid $pid)"
      echo "$BOOTSTRAP"
      return 0
    fi
    # Process alive but port closed: still starting (another caller) or wedged.
    log "pid $pid alive but $BOOTSTRAP not answering yet; waiting"
    wait_ready "$pid"
    echo "$BOOTSTRAP"
    return 0
  fi
  if port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
    die "$BOOTSTRAP is already in use by a process this script did not start; stop it, choose another KAFKA_PORT, or set KAFKA_BOOTSTRAP_SERVERS=$BOOTSTRAP to use it"
  fi
  if port_open "$KAFKA_HOST" "$KAFKA_CONTROLLER_PORT"; then
    die "controller port $KAFKA_HOST:$KAFKA_CONTROLLER_PORT is already in use; set KAFKA_CONTROLLER_PORT"
  fi
  if [[ "$KAFKA_SASL" == 1 ]] && port_open "$KAFKA_HOST" "$KAFKA_SASL_PORT"; then
    die "SASL port $KAFKA_HOST:$KAFKA_SASL_PORT is already in use; set KAFKA_SASL_PORT"
  fi

  check_sasl_settings
  require_java
  fetch_libs
  write_configs
  format_storage
  rm -f "$PID_FILE"

  log "starting Kafka $KAFKA_VERSION on $BOOTSTRAP (data: $DATA_DIR)"
  # - stdin/stdout/stderr detached: a caller doing $(kafka.sh start | tail -1) would
  #   otherwise hang until the broker exits, because it holds the pipe open.
  # - setsid: Ctrl-C / job-control signals sent to the caller's process group must not
  #   take the broker down with it (it is meant to outlive this script).
  # - 9>&-: do not leak our lock fd, or the broker would hold the lock forever.
  # shellcheck disable=SC2086  # heap/extra opts are flag lists
  nohup setsid "$JAVA" $KAFKA_HEAP_OPTS \
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG4J_CONF" -Dkafka.logs.dir="$LOG_DIR" \
    $KAFKA_OPTS -cp "$LIBS_DIR/*" kafka.Kafka "$SERVER_PROPS" \
    </dev/null >>"$LOG_DIR/kafka.out" 2>&1 9>&- &
  pid=$!
  echo "$pid" >"$PID_FILE"
  wait_ready "$pid"
  log "ready (pid $pid, ${SECONDS}s)"
  if [[ "$KAFKA_SASL" == 1 ]]; then
    log "SASL_PLAINTEXT (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) for user $KAFKA_SASL_USER on $KAFKA_HOST:$KAFKA_SASL_PORT"
  fi
  echo "$BOOTSTRAP"
}

cmd_stop() {
  local pid
  if pid="$(broker_pid)"; then
    log "stopping broker (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    # Controlled shutdown of a single combined node normally takes a few seconds.
    local i
    for ((i = 0; i < 300; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "broker did not exit within 30s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  else
    log "not running"
  fi
  rm -f "$PID_FILE"
  if [[ "${1:-}" == wipe && "${KAFKA_WIPE:-0}" == 1 ]]; then
    log "KAFKA_WIPE=1: deleting $DATA_DIR"
    rm -rf "$DATA_DIR"
  fi
}

cmd_restart() {
  cmd_stop keep # never wipes: a restart must keep topics and offsets
  cmd_start
}

cmd_status() {
  local pid
  if pid="$(broker_pid)" && port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
    echo "running $BOOTSTRAP (pid $pid)"
    return 0
  fi
  echo "stopped"
  return 1
}

# Serialise concurrent invocations for the same port (parallel CI jobs, test fixtures)
# so two callers never download, format or start the same broker at once.
with_lock() {
  mkdir -p "$CACHE"
  exec 9>"$CACHE/kafka-$KAFKA_PORT.lock"
  flock -w 600 9 || die "timed out waiting for $CACHE/kafka-$KAFKA_PORT.lock"
  "$@"
}

case "${1:-}" in
  start) with_lock cmd_start ;;
  stop) with_lock cmd_stop wipe ;;
  restart) with_lock cmd_restart ;;
  status) cmd_status ;;
  tool)
    shift
    [[ $# -ge 1 ]] || die "usage: $0 tool <main-class> [args...]"
    require_java
    with_lock fetch_libs
    [[ -f "$TOOLS_LOG4J_CONF" ]] || write_configs
    exec 9>&- # the tool may run for long (console consumer); do not hold the lock
    run_tool "$@"
    ;;
  *)
    echo "usage: $0 start|stop|restart|status|tool <main-class> [args...]" >&2
    exit 2
    ;;
esac
