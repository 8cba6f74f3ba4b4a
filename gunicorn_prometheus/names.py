"""Every metric name this package serves, in one place.

Dashboards, alert rules and tests refer to these names; a module that writes or serves a family imports
its name from here, so a rename is one edit. Counter families are named without ``_total`` (as
prometheus_client names them); the exposition adds the suffix.
"""

from __future__ import annotations

# --- HTTP metrics: starlette_exporter's names, labels and help texts ---------------------------------
REQUEST_DURATION = "starlette_request_duration_seconds"  # histogram: method, path, status_code, app_name
REQUESTS_IN_PROGRESS = "starlette_requests_in_progress"  # gauge: method, app_name
REQUESTS = "starlette_requests"  # counter, derived at scrape time from the histogram's _count
REQUEST_LABELS = ("method", "path", "status_code", "app_name")
IN_PROGRESS_LABELS = ("method", "app_name")

# --- Gunicorn's worker lifecycle (written by the master) ----------------------------------------------
WORKER_BOOTS = "gunicorn_worker_boots"  # counter
WORKER_EXITS = "gunicorn_worker_exits"  # counter: reason
REQUESTS_CUT_ON_STOP = "gunicorn_requests_cut_on_stop"  # counter: in flight when GRACEFUL_TIMEOUT ended

# --- read at scrape time from the OS and the master's state --------------------------------------------
WORKERS_DESIRED = "gunicorn_workers_desired"
WORKERS_ALIVE = "gunicorn_workers_alive"
WORKERS_SERVING = "gunicorn_workers_serving"
MASTER_UP = "gunicorn_master_up"
PROCESS_CPU = "gunicorn_process_cpu_seconds"  # counter: process (master, wN, metrics)
PROCESS_RSS = "gunicorn_process_resident_memory_bytes"
PROCESS_FDS = "gunicorn_process_open_fds"
PROCESS_THREADS = "gunicorn_process_threads"
PROCESS_START = "gunicorn_process_start_time_seconds"
WORKERS_CPU = "gunicorn_workers_cpu_seconds"  # counter
WORKERS_RSS = "gunicorn_workers_resident_memory_bytes"

# --- saturation: what request counters do not show ------------------------------------------------------
EVENT_LOOP_LAG = "gunicorn_worker_event_loop_lag_seconds"  # histogram: process (wN)
EVENT_LOOP_LAG_MAX = "gunicorn_worker_event_loop_lag_max_seconds"  # gauge: process, worst of last interval
THREADPOOL_IN_USE = "gunicorn_worker_threadpool_tokens_in_use"  # gauge: process
THREADPOOL_LIMIT = "gunicorn_worker_threadpool_tokens_limit"  # gauge: process
THREADPOOL_WAITING = "gunicorn_worker_threadpool_waiting"  # gauge: process
LISTEN_BACKLOG = "gunicorn_listen_backlog"  # gauge: listener; accepted by the kernel, not yet by a worker
LISTEN_BACKLOG_LIMIT = "gunicorn_listen_backlog_limit"  # gauge: listener

# --- the metrics side's own health ---------------------------------------------------------------------
METRICS_WRITE_ERRORS = "gunicorn_metrics_write_errors"  # counter: process; metric writes that failed
METRICS_READ_ERRORS = "gunicorn_metrics_read_errors"  # counter; files skipped as unreadable by scrapes
METRICS_SCRAPE_DURATION = "gunicorn_metrics_scrape_duration_seconds"  # gauge: the previous scrape's
METRICS_FILES = "gunicorn_metrics_files"  # gauge: files read by the last scrape
METRICS_SERIES = "gunicorn_metrics_series"  # gauge: samples served by the last scrape
