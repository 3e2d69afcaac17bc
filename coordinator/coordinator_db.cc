#include "coordinator/coordinator_db.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <memory>

#include "common/log_throttle.h"
#include "common/logging.h"

namespace muster::coordinator {

namespace {

constexpr const char* kSchema = R"(
CREATE TABLE IF NOT EXISTS nodes (
  name TEXT PRIMARY KEY,
  labels BLOB NOT NULL,
  state INTEGER NOT NULL,
  last_heartbeat_ms INTEGER NOT NULL,
  quarantines INTEGER NOT NULL,
  quarantined_until_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  seq INTEGER NOT NULL UNIQUE,
  spec BLOB NOT NULL,
  state INTEGER NOT NULL,
  attempt INTEGER NOT NULL,
  restarts INTEGER NOT NULL,
  preemptions INTEGER NOT NULL,
  nodes TEXT NOT NULL,
  detail TEXT NOT NULL,
  resume_step INTEGER NOT NULL,
  submitted_ms INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL,
  not_before_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
  job_id TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  nodes TEXT NOT NULL,
  started_ms INTEGER NOT NULL,
  ended_ms INTEGER NOT NULL,
  outcome TEXT NOT NULL,
  detail TEXT NOT NULL,
  PRIMARY KEY (job_id, attempt)
);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  time_ms INTEGER NOT NULL,
  job_id TEXT NOT NULL,
  node TEXT NOT NULL,
  kind TEXT NOT NULL,
  message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, id);
CREATE TABLE IF NOT EXISTS checkpoints (
  job_id TEXT NOT NULL,
  step INTEGER NOT NULL,
  volume TEXT NOT NULL,
  committed INTEGER NOT NULL,
  time_ms INTEGER NOT NULL,
  PRIMARY KEY (job_id, step, volume)
);
CREATE TABLE IF NOT EXISTS node_keys (
  name TEXT PRIMARY KEY,
  public_key TEXT NOT NULL,
  bound_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS job_exclusions (
  job_id TEXT NOT NULL,
  node TEXT NOT NULL,
  reason TEXT NOT NULL,
  time_ms INTEGER NOT NULL,
  PRIMARY KEY (job_id, node)
);
CREATE TABLE IF NOT EXISTS state (
  key TEXT PRIMARY KEY,
  value BLOB NOT NULL,
  time_ms INTEGER NOT NULL
);
)";

// Tables added after the first schema, each its own step (run on every open: IF NOT EXISTS).
// The checkpoint counters (checkpoint_stats.h): latency_buckets is "bound=count,..." for the
// non-cumulative bucket counts, so a changed set of bounds still reads back.
constexpr const char* kCheckpointCountersSchema = R"(
CREATE TABLE IF NOT EXISTS checkpoint_counters (
  job_id TEXT NOT NULL,
  provider TEXT NOT NULL,
  commits INTEGER NOT NULL,
  replicas INTEGER NOT NULL,
  commit_bytes INTEGER NOT NULL,
  replica_bytes INTEGER NOT NULL,
  latency_count INTEGER NOT NULL,
  latency_sum REAL NOT NULL,
  latency_buckets TEXT NOT NULL,
  PRIMARY KEY (job_id, provider)
);
)";

// The hot spares held for running jobs (PutSpares): one row per held node.
constexpr const char* kSparesSchema = R"(
CREATE TABLE IF NOT EXISTS job_spares (
  node TEXT PRIMARY KEY,
  job_id TEXT NOT NULL,
  time_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS job_spares_by_job ON job_spares (job_id);
)";

// Jobs whose next attempt must not resume from in-memory snapshots (PutSnapshotFallback).
constexpr const char* kSnapshotFallbacksSchema = R"(
CREATE TABLE IF NOT EXISTS job_snapshot_fallbacks (
  job_id TEXT PRIMARY KEY,
  reason TEXT NOT NULL,
  time_ms INTEGER NOT NULL
);
)";

std::string Join(const std::vector<std::string>& v) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? "," : "") + v[i];
  return out;
}

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  if (s.empty()) return out;
  size_t start = 0;
  while (true) {
    size_t comma = s.find(',', start);
    out.push_back(s.substr(start, comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

// A log of this many pages (SQLite's default for its own checkpoints) is copied into the
// database file by the flusher; smaller ones are only synced.
constexpr int kCheckpointPages = 1000;

// fdatasync of `db`'s log (its WAL file, as that connection holds it open since its first
// read). Ok when it has none open (nothing of it to sync).
Status SyncLog(sqlite3* db, const std::string& where) {
  sqlite3_file* log = nullptr;
  if (sqlite3_file_control(db, "main", SQLITE_FCNTL_JOURNAL_POINTER, &log) != SQLITE_OK ||
      log == nullptr || log->pMethods == nullptr) {
    return Status::Ok();
  }
  int rc = log->pMethods->xSync(log, SQLITE_SYNC_NORMAL);
  if (rc != SQLITE_OK) {
    return InternalError(
        fmt::format("fdatasync of {}-wal: {} (SQLite error {})", where, sqlite3_errstr(rc), rc));
  }
  return Status::Ok();
}

// What to say for a commit the flusher refused (SqliteCoordinatorDb::StartFlusher's commit
// hook), or "" for any other error.
std::string RefusedByFlusher(sqlite3* db) {
  if (sqlite3_extended_errcode(db) != SQLITE_CONSTRAINT_COMMITHOOK) return "";
  return "change refused: an earlier flush of the state database failed (logged as critical), "
         "so it may have lost what it could not write; restart the coordinator on a working disk";
}

// A prepared statement, finalized on scope exit.
class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) : db_(db) {
    rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr);
  }
  ~Stmt() { sqlite3_finalize(stmt_); }
  Status status() const {
    return rc_ == SQLITE_OK ? Status::Ok()
                            : InternalError(fmt::format("sqlite prepare: {}", sqlite3_errmsg(db_)));
  }
  Stmt& Bind(int i, int64_t v) {
    sqlite3_bind_int64(stmt_, i, v);
    return *this;
  }
  Stmt& Bind(int i, const std::string& v) {
    sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& BindDouble(int i, double v) {
    sqlite3_bind_double(stmt_, i, v);
    return *this;
  }
  Stmt& BindBlob(int i, const std::string& v) {
    sqlite3_bind_blob(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  // SQLITE_ROW: true; SQLITE_DONE: false; else error.
  StatusOr<bool> Step() {
    int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    if (auto refused = RefusedByFlusher(db_); !refused.empty()) {
      return InternalError(fmt::format("sqlite: {}", refused));
    }
    return InternalError(fmt::format("sqlite: {}", sqlite3_errmsg(db_)));
  }
  Status Run() {
    auto r = Step();
    return r.status();
  }
  int64_t Int(int col) { return sqlite3_column_int64(stmt_, col); }
  double Double(int col) { return sqlite3_column_double(stmt_, col); }
  std::string Text(int col) {
    const auto* p = sqlite3_column_blob(stmt_, col);
    int n = sqlite3_column_bytes(stmt_, col);
    return p ? std::string(static_cast<const char*>(p), n) : std::string();
  }

 private:
  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
  int rc_;
};

JobRecord ReadJob(Stmt& s) {
  JobRecord j;
  j.id = s.Text(0);
  j.seq = s.Int(1);
  j.spec.ParseFromString(s.Text(2));
  j.state = static_cast<proto::JobState>(s.Int(3));
  j.attempt = s.Int(4);
  j.restarts = s.Int(5);
  j.preemptions = s.Int(6);
  j.nodes = Split(s.Text(7));
  j.detail = s.Text(8);
  j.resume_step = s.Int(9);
  j.submitted_ms = s.Int(10);
  j.updated_ms = s.Int(11);
  j.not_before_ms = s.Int(12);
  j.submitter = s.Text(13);
  return j;
}

constexpr const char* kJobCols =
    "id, seq, spec, state, attempt, restarts, preemptions, nodes, detail, resume_step, "
    "submitted_ms, updated_ms, not_before_ms, submitter";

// The rows of a two-text-column SELECT, first column -> second.
StatusOr<std::map<std::string, std::string>> LoadTextPairs(sqlite3* db, const char* sql) {
  Stmt s(db, sql);
  MUSTER_RETURN_IF_ERROR(s.status());
  std::map<std::string, std::string> out;
  while (true) {
    MUSTER_ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    out[s.Text(0)] = s.Text(1);
  }
  return out;
}

}  // namespace

SqliteCoordinatorDb::SqliteCoordinatorDb(std::filesystem::path path, sqlite3* db, int lock_fd)
    : path_(std::move(path)), db_(db), lock_fd_(lock_fd) {}

SqliteCoordinatorDb::~SqliteCoordinatorDb() {
  if (flusher_) {
    sqlite3_wal_hook(db_, nullptr, nullptr);
    sqlite3_commit_hook(db_, nullptr, nullptr);
  }
  flusher_.reset();  // its last flush first, then its connection
  if (flush_db_) sqlite3_close_v2(flush_db_);
  sqlite3_close_v2(db_);
  if (lock_fd_ >= 0) close(lock_fd_);
}

StatusOr<std::unique_ptr<CoordinatorDb>> CoordinatorDb::Open(
    const std::filesystem::path& data_dir, std::chrono::milliseconds flush_interval) {
  std::error_code ec;
  std::filesystem::create_directories(data_dir, ec);
  if (ec) {
    return FailedPreconditionError(
        fmt::format("cannot create data dir {}: {}", data_dir.string(), ec.message()));
  }
  std::string lock_path = (data_dir / "coordinator.lock").string();
  int fd = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoStatus(errno, "open " + lock_path);
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    close(fd);
    return FailedPreconditionError(fmt::format(
        "data dir {} is in use by another coordinator (lock {})", data_dir.string(), lock_path));
  }
  auto path = data_dir / "coordinator.db";
  sqlite3* db = nullptr;
  int rc =
      sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close_v2(db);
    close(fd);
    return FailedPreconditionError(fmt::format("cannot open {}: {}", path.string(), msg));
  }
  std::unique_ptr<SqliteCoordinatorDb> store(new SqliteCoordinatorDb(path, db, fd));
  sqlite3_busy_timeout(db, 5000);
  bool wal = false;
  {
    Stmt q(db, "PRAGMA journal_mode=WAL");
    MUSTER_RETURN_IF_ERROR(q.status());
    MUSTER_ASSIGN_OR_RETURN(bool row, q.Step());
    wal = row && q.Text(0) == "wal";
  }
  // Until the flusher runs (below), each write is synced at its commit.
  MUSTER_RETURN_IF_ERROR(store->Exec("PRAGMA synchronous=FULL"));
  // The schema and its migrations in one transaction: one sync, not one per statement (a dozen
  // fsyncs on a loaded disk kept a starting coordinator from serving for over 10 s).
  auto migrate = [&]() -> Status {
    MUSTER_RETURN_IF_ERROR(store->Exec(kSchema));
    // Databases made before jobs recorded their submitter get the column (empty: only admin
    // keys may act on those jobs).
    bool has_submitter = false;
    {
      Stmt q(db, "PRAGMA table_info(jobs)");
      MUSTER_RETURN_IF_ERROR(q.status());
      while (true) {
        MUSTER_ASSIGN_OR_RETURN(bool row, q.Step());
        if (!row) break;
        if (q.Text(1) == "submitter") has_submitter = true;
      }
    }
    if (!has_submitter) {
      MUSTER_RETURN_IF_ERROR(
          store->Exec("ALTER TABLE jobs ADD COLUMN submitter TEXT NOT NULL DEFAULT ''"));
    }
    MUSTER_RETURN_IF_ERROR(store->Exec(kCheckpointCountersSchema));
    // Databases made before hot spares were kept get the (empty) table.
    MUSTER_RETURN_IF_ERROR(store->Exec(kSparesSchema));
    // Databases made before snapshot fallbacks were kept get the (empty) table.
    return store->Exec(kSnapshotFallbacksSchema);
  };
  MUSTER_RETURN_IF_ERROR(store->Exec("BEGIN IMMEDIATE"));
  if (Status st = migrate(); !st.ok()) {
    store->Exec("ROLLBACK").IgnoreError();
    return st;
  }
  MUSTER_RETURN_IF_ERROR(store->Exec("COMMIT"));
  // The flusher needs the log (WAL) and a library that lets two connections work on two
  // threads; without either, every write stays synced at its commit.
  if (flush_interval.count() > 0 && wal && sqlite3_threadsafe() != 0) {
    MUSTER_RETURN_IF_ERROR(store->StartFlusher(flush_interval));
  }
  return std::unique_ptr<CoordinatorDb>(std::move(store));
}

Status SqliteCoordinatorDb::Exec(const std::string& sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown";
    sqlite3_free(err);
    if (auto refused = RefusedByFlusher(db_); !refused.empty()) msg = refused;
    return InternalError(fmt::format("sqlite {}: {}", path_.string(), msg));
  }
  return Status::Ok();
}

Status SqliteCoordinatorDb::StartFlusher(std::chrono::milliseconds interval) {
  int rc = sqlite3_open_v2(path_.c_str(), &flush_db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_FULLMUTEX,
                           nullptr);
  auto fail = [&](const std::string& what) {
    return FailedPreconditionError(fmt::format("cannot open {} for its flusher: {}: {}",
                                               path_.string(), what, sqlite3_errmsg(flush_db_)));
  };
  if (rc != SQLITE_OK) return fail("open");
  // Its checkpoints sync the log before they copy it, and the database file after. A read opens
  // the log on this connection, so that its file can be synced (below).
  if (sqlite3_exec(flush_db_, "PRAGMA synchronous=NORMAL; SELECT count(*) FROM sqlite_master",
                   nullptr, nullptr, nullptr) != SQLITE_OK) {
    return fail("first read");
  }
  sqlite3* ckpt = flush_db_;
  sqlite3* main = db_;  // FULLMUTEX: its file_control may be called from the flusher's thread
  std::string where = path_.string();
  std::atomic<uint64_t>* errors = &checkpoint_errors_;
  auto throttle = std::make_shared<LogThrottle>(std::chrono::minutes(1));
  flusher_ = std::make_unique<WalFlusher>(
      interval, [ckpt, main, where, errors, throttle](int pages) -> Status {
        if (pages >= kCheckpointPages) {
          // Copy the log into the database file, so that the next commit starts it over (a
          // restart syncs the log's header on the committing thread: rare at this size). BUSY:
          // another checkpoint runs (an operator's shell); the next flush tries again.
          //
          // A write that failed (a full disk: SQLITE_FULL; an I/O error on write or truncate)
          // loses nothing: SQLite records frames as copied only when the whole checkpoint
          // succeeded, so the log still holds them, a restart replays it, and the next
          // checkpoint writes the same pages again. Those are counted (/metrics), logged, and
          // retried; the log grows until one works. A failed sync of the database file (and
          // anything else) latches like a failed sync of the log: an earlier checkpoint that
          // stopped short of the log's end marked its frames copied without a sync, and if the
          // kernel could not write them back, a retry that succeeds would let the log restart
          // without them.
          int log = -1, done = -1;
          int rc = sqlite3_wal_checkpoint_v2(ckpt, "main", SQLITE_CHECKPOINT_PASSIVE, &log, &done);
          if (rc != SQLITE_OK && rc != SQLITE_BUSY) {
            const int ext = sqlite3_extended_errcode(ckpt);
            if (ext != SQLITE_FULL && ext != SQLITE_IOERR_WRITE && ext != SQLITE_IOERR_TRUNCATE) {
              return InternalError(fmt::format("checkpoint of {}: {} (SQLite error {})", where,
                                               sqlite3_errmsg(ckpt), ext));
            }
            errors->fetch_add(1, std::memory_order_relaxed);
            if (auto held = throttle->Admit("checkpoint", LogThrottle::Clock::now())) {
              log::Get("coord.db")
                  ->warn(
                      "checkpoint of {} into its database file failed: {} (SQLite error {}); the "
                      "log keeps every change and the next flush tries again ({} more failures "
                      "not logged since the last line; the log has {} pages)",
                      where, sqlite3_errmsg(ckpt), ext, *held, pages);
            }
          }
        }
        // Whatever the checkpoint did, an fdatasync of the log makes every committed change durable
        // (a restart after power loss replays the log).
        return SyncLog(main, where);
      });
  WalFlusher* f = flusher_.get();
  // After each commit's log is written (this replaces SQLite's own checkpoints on the caller's
  // thread: the flusher checkpoints).
  sqlite3_wal_hook(
      db_,
      [](void* arg, sqlite3*, const char*, int pages) {
        static_cast<WalFlusher*>(arg)->NoteCommit(pages);
        return SQLITE_OK;
      },
      f);
  // Before each commit: none once a flush failed (the commit is rolled back).
  sqlite3_commit_hook(
      db_, [](void* arg) { return static_cast<WalFlusher*>(arg)->error().ok() ? 0 : 1; }, f);
  return Exec("PRAGMA synchronous=NORMAL");
}

Status SqliteCoordinatorDb::Sync() {
  if (!flusher_) return Status::Ok();  // every commit was synced
  // On this thread, without the flusher: an fdatasync of the log as this connection, which has
  // just written it, holds it. A failure latches as the flusher's does.
  if (Status st = flusher_->error(); !st.ok()) return st;
  return SyncLog(db_, path_.string());
}

Status SqliteCoordinatorDb::FlushError() const {
  return flusher_ ? flusher_->error() : Status::Ok();
}

CoordinatorDb::Durability SqliteCoordinatorDb::GetDurability() const {
  Durability d;
  if (!flusher_) return d;
  const WalFlusher::Stats f = flusher_->stats();
  d.flusher = true;
  d.commits = f.committed;
  d.durable = f.durable;
  d.log_pages = f.log_pages;
  d.failed = f.failed;
  d.checkpoint_errors = checkpoint_errors_.load(std::memory_order_relaxed);
  d.last_flush_seconds = f.last_flush_seconds;
  d.max_flush_seconds = f.max_flush_seconds;
  return d;
}

Status SqliteCoordinatorDb::PutNode(const NodeRecord& n) {
  Stmt s(db_,
         "INSERT OR REPLACE INTO nodes (name, labels, state, last_heartbeat_ms, quarantines, "
         "quarantined_until_ms) VALUES (?, ?, ?, ?, ?, ?)");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, n.labels.name())
      .BindBlob(2, n.labels.SerializeAsString())
      .Bind(3, static_cast<int64_t>(n.state))
      .Bind(4, n.last_heartbeat_ms)
      .Bind(5, int64_t{n.quarantines})
      .Bind(6, n.quarantined_until_ms);
  return s.Run();
}

Status SqliteCoordinatorDb::DeleteNode(const std::string& name) {
  Stmt s(db_, "DELETE FROM nodes WHERE name = ?");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, name);
  return s.Run();
}

StatusOr<std::vector<NodeRecord>> SqliteCoordinatorDb::LoadNodes() {
  Stmt s(db_,
         "SELECT labels, state, last_heartbeat_ms, quarantines, quarantined_until_ms FROM nodes "
         "ORDER BY name");
  MUSTER_RETURN_IF_ERROR(s.status());
  std::vector<NodeRecord> out;
  while (true) {
    MUSTER_ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    NodeRecord n;
    if (!n.labels.ParseFromString(s.Text(0))) return DataLossError("corrupt node labels row");
    n.state = static_cast<proto::NodeStatusState>(s.Int(1));
    n.last_heartbeat_ms = s.Int(2);
    n.quarantines = s.Int(3);
    n.quarantined_until_ms = s.Int(4);
    out.push_back(std::move(n));
  }
  return out;
}

Status SqliteCoordinatorDb::InsertJob(JobRecord* j) {
  MUSTER_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  auto fail = [&](Status st) {
    Exec("ROLLBACK").IgnoreError();
    return st;
  };
  {
    Stmt q(db_, "SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs");
    if (!q.status().ok()) return fail(q.status());
    auto row = q.Step();
    if (!row.ok()) return fail(row.status());
    j->seq = q.Int(0);
  }
  if (j->id.empty()) j->id = fmt::format("{}-{}", j->spec.name(), j->seq);
  {
    Stmt s(db_, fmt::format("INSERT INTO jobs ({}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", kJobCols)
                    .c_str());
    if (!s.status().ok()) return fail(s.status());
    s.Bind(1, j->id)
        .Bind(2, static_cast<int64_t>(j->seq))
        .BindBlob(3, j->spec.SerializeAsString())
        .Bind(4, static_cast<int64_t>(j->state))
        .Bind(5, int64_t{j->attempt})
        .Bind(6, int64_t{j->restarts})
        .Bind(7, int64_t{j->preemptions})
        .Bind(8, Join(j->nodes))
        .Bind(9, j->detail)
        .Bind(10, j->resume_step)
        .Bind(11, j->submitted_ms)
        .Bind(12, j->updated_ms)
        .Bind(13, j->not_before_ms)
        .Bind(14, j->submitter);
    Status st = s.Run();
    if (!st.ok()) return fail(st);
  }
  return Exec("COMMIT");
}

Status SqliteCoordinatorDb::UpdateJob(const JobRecord& j) {
  Stmt s(db_,
         "UPDATE jobs SET spec=?, state=?, attempt=?, restarts=?, preemptions=?, nodes=?, "
         "detail=?, resume_step=?, updated_ms=?, not_before_ms=? WHERE id=?");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.BindBlob(1, j.spec.SerializeAsString())
      .Bind(2, static_cast<int64_t>(j.state))
      .Bind(3, int64_t{j.attempt})
      .Bind(4, int64_t{j.restarts})
      .Bind(5, int64_t{j.preemptions})
      .Bind(6, Join(j.nodes))
      .Bind(7, j.detail)
      .Bind(8, j.resume_step)
      .Bind(9, j.updated_ms)
      .Bind(10, j.not_before_ms)
      .Bind(11, j.id);
  MUSTER_RETURN_IF_ERROR(s.Run());
  if (sqlite3_changes(db_) == 0) return NotFoundError("no job " + j.id);
  return Status::Ok();
}

StatusOr<JobRecord> SqliteCoordinatorDb::GetJob(const std::string& id) {
  Stmt s(db_, fmt::format("SELECT {} FROM jobs WHERE id = ?", kJobCols).c_str());
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, id);
  MUSTER_ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return NotFoundError("no job " + id);
  return ReadJob(s);
}

Status SqliteCoordinatorDb::BindNodeKey(const std::string& name, const std::string& public_key,
                                        int64_t time_ms) {
  Stmt s(db_, "INSERT OR REPLACE INTO node_keys (name, public_key, bound_ms) VALUES (?, ?, ?)");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, name).Bind(2, public_key).Bind(3, time_ms);
  return s.Run();
}

StatusOr<std::map<std::string, std::string>> SqliteCoordinatorDb::LoadNodeKeys() {
  return LoadTextPairs(db_, "SELECT name, public_key FROM node_keys");
}

StatusOr<std::vector<JobRecord>> SqliteCoordinatorDb::LoadJobs() {
  Stmt s(db_, fmt::format("SELECT {} FROM jobs ORDER BY seq", kJobCols).c_str());
  MUSTER_RETURN_IF_ERROR(s.status());
  std::vector<JobRecord> out;
  while (true) {
    MUSTER_ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    out.push_back(ReadJob(s));
  }
  return out;
}

Status SqliteCoordinatorDb::PutAttempt(const AttemptRecord& a) {
  Stmt s(db_,
         "INSERT OR REPLACE INTO attempts (job_id, attempt, nodes, started_ms, ended_ms, outcome, "
         "detail) VALUES (?,?,?,?,?,?,?)");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, a.job_id)
      .Bind(2, int64_t{a.attempt})
      .Bind(3, Join(a.nodes))
      .Bind(4, a.started_ms)
      .Bind(5, a.ended_ms)
      .Bind(6, a.outcome)
      .Bind(7, a.detail);
  return s.Run();
}

StatusOr<std::vector<AttemptRecord>> SqliteCoordinatorDb::LoadAttempts(const std::string& job_id) {
  Stmt s(db_,
         "SELECT job_id, attempt, nodes, started_ms, ended_ms, outcome, detail FROM attempts "
         "WHERE job_id = ? ORDER BY attempt");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, job_id);
  std::vector<AttemptRecord> out;
  while (true) {
    MUSTER_ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    AttemptRecord a;
    a.job_id = s.Text(0);
    a.attempt = s.Int(1);
    a.nodes = Split(s.Text(2));
    a.started_ms = s.Int(3);
    a.ended_ms = s.Int(4);
    a.outcome = s.Text(5);
    a.detail = s.Text(6);
    out.push_back(std::move(a));
  }
  return out;
}

StatusOr<int64_t> SqliteCoordinatorDb::AppendEvent(const proto::Event& e) {
  Stmt s(db_, "INSERT INTO events (time_ms, job_id, node, kind, message) VALUES (?,?,?,?,?)");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, e.time_ms())
      .Bind(2, e.job_id())
      .Bind(3, e.node())
      .Bind(4, e.kind())
      .Bind(5, e.message());
  MUSTER_RETURN_IF_ERROR(s.Run());
  return static_cast<int64_t>(sqlite3_last_insert_rowid(db_));
}

StatusOr<std::vector<proto::Event>> SqliteCoordinatorDb::Events(const std::string& job_id,
                                                                int64_t after_id, int limit) {
  const char* sql =
      job_id.empty()
          ? "SELECT id, time_ms, job_id, node, kind, message FROM events WHERE id > ? ORDER BY "
            "id LIMIT ?"
          : "SELECT id, time_ms, job_id, node, kind, message FROM events WHERE id > ? AND "
            "job_id = ? ORDER BY id LIMIT ?";
  Stmt s(db_, sql);
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, after_id);
  if (job_id.empty()) {
    s.Bind(2, int64_t{limit});
  } else {
    s.Bind(2, job_id).Bind(3, int64_t{limit});
  }
  std::vector<proto::Event> out;
  while (true) {
    MUSTER_ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    proto::Event e;
    e.set_id(s.Int(0));
    e.set_time_ms(s.Int(1));
    e.set_job_id(s.Text(2));
    e.set_node(s.Text(3));
    e.set_kind(s.Text(4));
    e.set_message(s.Text(5));
    out.push_back(std::move(e));
  }
  return out;
}

Status SqliteCoordinatorDb::RecordCheckpoint(const CheckpointRecord& c) {
  Stmt s(db_,
         "INSERT OR REPLACE INTO checkpoints (job_id, step, volume, committed, time_ms) VALUES "
         "(?,?,?,?,?)");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, c.job_id)
      .Bind(2, c.step)
      .Bind(3, c.volume)
      .Bind(4, int64_t{c.committed ? 1 : 0})
      .Bind(5, c.time_ms);
  return s.Run();
}

StatusOr<std::vector<CheckpointRecord>> SqliteCoordinatorDb::Checkpoints(
    const std::string& job_id) {
  Stmt s(db_,
         "SELECT job_id, step, volume, committed, time_ms FROM checkpoints WHERE job_id = ? "
         "ORDER BY step, volume");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, job_id);
  std::vector<CheckpointRecord> out;
  while (true) {
    MUSTER_ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    out.push_back({s.Text(0), s.Int(1), s.Text(2), s.Int(3) != 0, s.Int(4)});
  }
  return out;
}

StatusOr<std::optional<int64_t>> SqliteCoordinatorDb::LatestCommittedStep(
    const std::string& job_id, const std::string& volume) {
  const char* sql = volume.empty() ? "SELECT MAX(step) FROM checkpoints WHERE job_id = ? AND "
                                     "committed = 1"
                                   : "SELECT MAX(step) FROM checkpoints WHERE job_id = ? AND "
                                     "committed = 1 AND volume = ?";
  Stmt s(db_, sql);
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, job_id);
  if (!volume.empty()) s.Bind(2, volume);
  MUSTER_ASSIGN_OR_RETURN(bool row, s.Step());
  std::optional<int64_t> out;
  if (row && !s.Text(0).empty()) out = s.Int(0);
  return out;
}

Status SqliteCoordinatorDb::ExcludeNode(const std::string& job_id, const std::string& node,
                                        const std::string& reason, int64_t time_ms) {
  Stmt s(db_,
         "INSERT OR IGNORE INTO job_exclusions (job_id, node, reason, time_ms) VALUES (?,?,?,?)");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, job_id).Bind(2, node).Bind(3, reason).Bind(4, time_ms);
  return s.Run();
}

StatusOr<std::map<std::string, std::set<std::string>>> SqliteCoordinatorDb::LoadExclusions() {
  Stmt s(db_, "SELECT job_id, node FROM job_exclusions");
  MUSTER_RETURN_IF_ERROR(s.status());
  std::map<std::string, std::set<std::string>> out;
  while (true) {
    MUSTER_ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    out[s.Text(0)].insert(s.Text(1));
  }
  return out;
}

Status SqliteCoordinatorDb::PutState(const std::string& key, const std::string& value,
                                     int64_t time_ms) {
  Stmt s(db_, "INSERT OR REPLACE INTO state (key, value, time_ms) VALUES (?,?,?)");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, key).BindBlob(2, value).Bind(3, time_ms);
  return s.Run();
}

StatusOr<std::optional<std::string>> SqliteCoordinatorDb::GetState(const std::string& key) {
  Stmt s(db_, "SELECT value FROM state WHERE key = ?");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, key);
  MUSTER_ASSIGN_OR_RETURN(bool row, s.Step());
  std::optional<std::string> out;
  if (row) out = s.Text(0);
  return out;
}

namespace {

std::string EncodeBuckets(const CommitHistogram& h) {
  std::string out;
  for (int i = 0; i < CommitHistogram::kBuckets; ++i) {
    out += fmt::format("{}{}={}", i ? "," : "", CommitHistogram::kBounds[i], h.counts[i]);
  }
  return out;
}

// A bound no longer in kBounds counts in the next larger one (above the last: only in `count`,
// the +Inf bucket), so cumulative buckets never go down.
Status DecodeBuckets(const std::string& text, CommitHistogram* h) {
  for (const auto& pair : Split(text)) {
    double bound = 0;
    unsigned long long n = 0;
    if (std::sscanf(pair.c_str(), "%lf=%llu", &bound, &n) != 2) {
      return DataLossError(fmt::format("checkpoint_counters: bucket '{}' does not parse", pair));
    }
    for (int i = 0; i < CommitHistogram::kBuckets; ++i) {
      if (bound <= CommitHistogram::kBounds[i]) {
        h->counts[i] += n;
        break;
      }
    }
  }
  return Status::Ok();
}

}  // namespace

Status SqliteCoordinatorDb::RecordCheckpointCounted(const CheckpointRecord& ckpt,
                                                    const std::string& provider,
                                                    const CheckpointStats& count) {
  MUSTER_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  auto fail = [&](Status st) {
    Exec("ROLLBACK").IgnoreError();
    return st;
  };
  // A step already committed on that volume is not counted again: the same report sent again
  // (its answer lost with a coordinator that died after the commit).
  bool again = false;
  {
    Stmt q(db_, "SELECT committed FROM checkpoints WHERE job_id = ? AND step = ? AND volume = ?");
    if (!q.status().ok()) return fail(q.status());
    q.Bind(1, ckpt.job_id).Bind(2, ckpt.step).Bind(3, ckpt.volume);
    auto row = q.Step();
    if (!row.ok()) return fail(row.status());
    again = *row && q.Int(0) != 0 && ckpt.committed;
  }
  Status st = RecordCheckpoint(ckpt);
  if (!st.ok()) return fail(st);
  if (again) return Exec("COMMIT");
  auto all = CheckpointCounters(ckpt.job_id);
  if (!all.ok()) return fail(all.status());
  CheckpointStats row = (*all)[provider];
  row.Merge(count);
  Stmt s(db_,
         "INSERT OR REPLACE INTO checkpoint_counters (job_id, provider, commits, replicas, "
         "commit_bytes, replica_bytes, latency_count, latency_sum, latency_buckets) VALUES "
         "(?,?,?,?,?,?,?,?,?)");
  if (!s.status().ok()) return fail(s.status());
  s.Bind(1, ckpt.job_id)
      .Bind(2, provider)
      .Bind(3, static_cast<int64_t>(row.commits))
      .Bind(4, static_cast<int64_t>(row.replicas))
      .Bind(5, static_cast<int64_t>(row.commit_bytes))
      .Bind(6, static_cast<int64_t>(row.replica_bytes))
      .Bind(7, static_cast<int64_t>(row.latency.count))
      .BindDouble(8, row.latency.sum)
      .Bind(9, EncodeBuckets(row.latency));
  st = s.Run();
  if (!st.ok()) return fail(st);
  return Exec("COMMIT");
}

StatusOr<std::map<std::string, CheckpointStats>> SqliteCoordinatorDb::CheckpointCounters(
    const std::string& job_id) {
  Stmt s(db_,
         "SELECT provider, commits, replicas, commit_bytes, replica_bytes, latency_count, "
         "latency_sum, latency_buckets FROM checkpoint_counters WHERE job_id = ?");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, job_id);
  std::map<std::string, CheckpointStats> out;
  while (true) {
    MUSTER_ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    CheckpointStats& c = out[s.Text(0)];
    c.commits = s.Int(1);
    c.replicas = s.Int(2);
    c.commit_bytes = s.Int(3);
    c.replica_bytes = s.Int(4);
    c.latency.count = s.Int(5);
    c.latency.sum = s.Double(6);
    MUSTER_RETURN_IF_ERROR(DecodeBuckets(s.Text(7), &c.latency));
  }
  return out;
}

Status SqliteCoordinatorDb::PutSpares(const std::string& job_id,
                                      const std::vector<std::string>& nodes, int64_t time_ms) {
  MUSTER_RETURN_IF_ERROR(Exec("BEGIN IMMEDIATE"));
  auto fail = [&](Status st) {
    Exec("ROLLBACK").IgnoreError();
    return st;
  };
  {
    Stmt d(db_, "DELETE FROM job_spares WHERE job_id = ?");
    if (!d.status().ok()) return fail(d.status());
    d.Bind(1, job_id);
    if (Status st = d.Run(); !st.ok()) return fail(st);
  }
  for (const auto& node : nodes) {
    Stmt s(db_, "INSERT OR REPLACE INTO job_spares (node, job_id, time_ms) VALUES (?,?,?)");
    if (!s.status().ok()) return fail(s.status());
    s.Bind(1, node).Bind(2, job_id).Bind(3, time_ms);
    if (Status st = s.Run(); !st.ok()) return fail(st);
  }
  return Exec("COMMIT");
}

StatusOr<std::map<std::string, std::vector<std::string>>> SqliteCoordinatorDb::LoadSpares() {
  Stmt s(db_, "SELECT job_id, node FROM job_spares ORDER BY job_id, node");
  MUSTER_RETURN_IF_ERROR(s.status());
  std::map<std::string, std::vector<std::string>> out;
  while (true) {
    MUSTER_ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    out[s.Text(0)].push_back(s.Text(1));
  }
  return out;
}

Status SqliteCoordinatorDb::PutSnapshotFallback(const std::string& job_id,
                                                const std::string& reason, int64_t time_ms) {
  if (reason.empty()) {
    Stmt d(db_, "DELETE FROM job_snapshot_fallbacks WHERE job_id = ?");
    MUSTER_RETURN_IF_ERROR(d.status());
    d.Bind(1, job_id);
    return d.Run();
  }
  Stmt s(db_,
         "INSERT OR REPLACE INTO job_snapshot_fallbacks (job_id, reason, time_ms) VALUES (?,?,?)");
  MUSTER_RETURN_IF_ERROR(s.status());
  s.Bind(1, job_id).Bind(2, reason).Bind(3, time_ms);
  return s.Run();
}

StatusOr<std::map<std::string, std::string>> SqliteCoordinatorDb::LoadSnapshotFallbacks() {
  return LoadTextPairs(db_, "SELECT job_id, reason FROM job_snapshot_fallbacks");
}

}  // namespace muster::coordinator
