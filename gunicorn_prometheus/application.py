"""The Gunicorn master /start.sh runs: Gunicorn's own command line, any config file, our hooks always.

`serve()` is what `python -m gunicorn_prometheus serve -k <class> -c <conf> <module:app>` runs. It takes
Gunicorn's usual arguments (so the master's command line still shows `-c <the config file in use>`, as
tools written for upstream's image read it), validates the environment, prepares the multiprocess
directory before any config file or app is imported, and runs Gunicorn through its public
custom-application API: `Application.load_config` lets Gunicorn read the command line, the config file
and GUNICORN_CMD_ARGS exactly as `gunicorn` does, then checks what will really be used and chains our
hooks with whatever the file set. A user's upstream-style `gunicorn_conf.py` that knows nothing of us
keeps the metrics.

Everything is checked in this one process, before Gunicorn binds or forks: no separate validation
interpreter delays the start. The metrics side is started even earlier, before Gunicorn is imported
(see `early_start`), and stopped again if the start fails.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from gunicorn.app.wsgiapp import WSGIApplication
from gunicorn.config import Config
from gunicorn.errors import AppImportError

from . import early_start, launch
from .hooks import Master, config_error_exit
from .settings import ConfigError, current


class Application(WSGIApplication):
    """Gunicorn's WSGIApplication (it loads any app uri, ASGI ones included) with our master attached."""

    def __init__(self, master: Master, usage: str | None = None, prog: str | None = None) -> None:
        self.master = master
        self.conf_values: dict[str, Any] = {}
        self.conf_path: str | None = None
        self.started = False
        super().__init__(usage, prog)

    def load_default_config(self) -> None:
        """Our defaults go in before the config file, which (like GUNICORN_CMD_ARGS) may override them."""
        super().load_default_config()
        settings = self.master.settings
        if settings.gunicorn_control_socket:
            self.cfg.set("control_socket", settings.gunicorn_control_socket)
        else:
            # Gunicorn 25+ creates $HOME/.gunicorn/gunicorn.ctl by default: off unless asked for, so a
            # read-only root or a user without a home starts cleanly whatever the config file.
            self.cfg.set("control_socket_disable", True)

    def load_config_from_file(self, filename: str) -> dict[str, Any]:
        self.conf_path = filename
        self.conf_values = super().load_config_from_file(filename)
        return self.conf_values

    def load_config(self) -> None:
        super().load_config()
        self.master.conf_path = self.conf_path
        if not self.started:
            # Before the first start only: on a reload (SIGHUP) the ports are ours already, and a
            # mistake in the re-read file is Gunicorn's to report while the old workers keep serving.
            try:
                self.check()
            except ConfigError as err:
                raise config_error_exit(err) from None
        self.master.install(self.cfg)

    def run(self) -> None:
        self.started = True
        if self.cfg.daemon:
            # Gunicorn forks the master away and its first process exits: the metrics side, started
            # before, watches that one and would leave with it. The daemon starts its own (when_ready).
            self.master.stop_metrics()
        super().run()

    def check(self) -> None:
        """What Gunicorn will really use, checked now (see `launch`), naming where each value came from."""
        settings = self.master.settings
        parser = self.cfg.parser()
        cmd_args = vars(parser.parse_args(self.cfg.get_cmd_args_from_env()))
        sources = launch.Sources(settings, self.conf_path, self.conf_values, cmd_args, os.environ)
        given = self.cfg.settings["worker_class"].get()
        given_name = getattr(given, "__name__", given)
        launch.check_worker_class(lambda: self.cfg.worker_class, sources.worker_class(given_name))
        launch.check_app(self.app_uri, settings, os.environ)
        launch.check_binds(self.cfg.bind, sources)
        launch.check_control_socket(self.cfg, os.environ)

    def load(self) -> Any:
        """Import the app (in each worker); a missing variable is named as the variable that named it."""
        try:
            return super().load()
        except AppImportError as err:
            _, attribute_source = launch.app_source(self.master.settings, os.environ, self.app_uri or "")
            message = f"gunicorn-prometheus: configuration error: {attribute_source}: {err}"
            raise AppImportError(message) from None


def serve(argv: list[str], started: early_start.Started | None = None) -> int:
    """Run the master with Gunicorn's command-line arguments `argv`; returns only on a start-up error.

    `started`: what `early_start` started before Gunicorn was imported. However the master ends (a
    mistake found in the config file, Gunicorn's own exit, a normal stop), the metrics side is stopped
    and the directory released before it exits: nothing of ours is left behind.
    """
    settings = current()
    master = Master(settings, started)
    try:
        try:
            if settings.app_dir not in sys.path:
                sys.path.insert(0, settings.app_dir)  # the app is found from APP_DIR, wherever we start
            args = Config().parser().parse_args(argv)
            if args.config is None:
                argv = ["-c", settings.conf_path, *argv]
            launch.check_conf_file(args.config or settings.conf_path, settings, os.environ)
            if not args.args:
                launch.check_app(settings.app, settings, os.environ)  # names MODULE_NAME when none is found
                argv = [*argv, str(settings.app)]
            master.prepare()
        except ConfigError as err:
            raise config_error_exit(err) from None
        sys.argv = ["gunicorn", *argv]
        Application(master, "%(prog)s [OPTIONS] [APP_MODULE]", prog="gunicorn").run()
    finally:
        if os.getpid() == master.pid:  # not in a worker, whose exit unwinds through here too
            master.close()
    return 0
