"""How many workers serve the app and how many requests each runs at once, read from gunicorn's own settings.

gunicorn decides its settings in layers, later ones winning: the default
(`WEB_CONCURRENCY` for `workers`), the config file (`-c`, else
`./gunicorn.conf.py`), `GUNICORN_CMD_ARGS`, then its command line.
`detect_deployment` runs the same layers through gunicorn's classes: a
`gunicorn.config.Config`, its argument parser for `GUNICORN_CMD_ARGS`,
`Config.set` (so a value gunicorn would refuse is refused here too) and
`Application.load_config_from_file` for the file. `flask proxypool size`'s
`--workers`/`--threads` stand for gunicorn's command line.

Without gunicorn installed only `WEB_CONCURRENCY` and the explicit numbers
count, and the advice says so in a note.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import os
import shlex
import sys
import typing as t
from pathlib import Path

__all__ = ["Deployment", "detect_deployment"]

#: gunicorn worker classes whose concurrency is ``worker_connections``, not threads
ASYNC_WORKERS = ("gevent", "eventlet", "tornado")

#: the gunicorn settings sizing reads; a source that sets none of them is not named as one
SIZING_SETTINGS = ("workers", "threads", "worker_class", "worker_connections")

_DEFAULT_FILE = "gunicorn.conf.py"


@dataclasses.dataclass(frozen=True)
class Deployment:
    """How many processes serve the app, and how many requests each runs at once."""

    workers: int = 1
    threads: int = 1
    worker_class: str = "sync"
    #: requests in flight at once in an async worker (gevent, eventlet)
    worker_connections: int = 1000
    source: str = "default"  #: where the numbers came from
    notes: tuple[str, ...] = ()
    #: gunicorn's ``preload_app``: the master loads the app, then forks the workers
    preload: bool = False
    #: the ``when_ready`` server hook, as ``module.qualname`` (gunicorn's own default does nothing)
    when_ready: str = ""

    @property
    def is_async(self) -> bool:
        return any(a in self.worker_class for a in ASYNC_WORKERS)

    @property
    def concurrency(self) -> int:
        """Requests one worker serves at once: its threads, or `worker_connections` for gevent."""
        return self.worker_connections if self.is_async else self.threads

    def to_dict(self) -> dict[str, t.Any]:
        return {**dataclasses.asdict(self), "notes": list(self.notes), "concurrency": self.concurrency}


def detect_deployment(
    workers: int | None = None,
    threads: int | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    environ: t.Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Deployment:
    """Workers and threads as gunicorn would set them; 1 x 1 when nothing says.

    Later wins: `WEB_CONCURRENCY`, the config file, `GUNICORN_CMD_ARGS`,
    then `workers`/`threads` (gunicorn's command line). The config file is
    `config_file` (gunicorn's `-c`: a path, `file:PATH` or
    `python:MODULE`), else the `-c` of `GUNICORN_CMD_ARGS`, else
    `gunicorn.conf.py` in `cwd` (default: the current directory). A
    layer that cannot be read is left out, with a note saying why.

    Args:
        environ: the environment to read (default `os.environ`).
    """
    env = os.environ if environ is None else environ
    here = Path(cwd) if cwd is not None else Path.cwd()
    sources: list[str] = []
    notes: list[str] = []
    web_concurrency = _web_concurrency(env, sources, notes)
    options = {k: v for k, v in (("workers", workers), ("threads", threads)) if v is not None}
    try:
        settings = _gunicorn_settings(web_concurrency, config_file, options, env, here, sources, notes)
    except ImportError:
        settings = _settings_without_gunicorn(web_concurrency, config_file, options, env, here, notes)
    if options:
        sources.append("options")
    if not sources:
        notes.append(
            "no gunicorn settings found (GUNICORN_CMD_ARGS, gunicorn.conf.py, --workers/--threads): "
            "assuming 1 worker x 1 thread"
        )
    d = Deployment(
        workers=max(int(settings["workers"]), 1),
        threads=max(int(settings["threads"]), 1),
        worker_class=str(settings["worker_class"]),
        worker_connections=max(int(settings["worker_connections"]), 1),
        source=", ".join(sources) or "default",
        preload=bool(settings.get("preload", False)),
        when_ready=str(settings.get("when_ready", "")),
    )
    if d.is_async:
        notes.append(
            f"{d.worker_class} workers serve up to worker_connections ({d.worker_connections}) requests at once: "
            "size pools by the rate (--rate), not by threads"
        )
    return dataclasses.replace(d, notes=tuple(notes))


def _web_concurrency(env: t.Mapping[str, str], sources: list[str], notes: list[str]) -> int | None:
    """gunicorn's default for `workers`; it reads the variable once, at import, so it is read here by hand."""
    raw = env.get("WEB_CONCURRENCY")
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        notes.append(f"WEB_CONCURRENCY={raw!r} is not a positive number of workers: ignored")
        return None
    sources.append("WEB_CONCURRENCY")
    return value


def _config_location(given: str | os.PathLike[str], here: Path) -> str:
    """A `-c` value as gunicorn takes it, relative paths from `here` (gunicorn's working directory);
    `python:MODULE` is imported as is."""
    text = os.fspath(given)
    if text.startswith("python:"):
        return text
    return str(here / text.removeprefix("file:"))  # an absolute path stays itself


def _gunicorn_settings(
    web_concurrency: int | None,
    config_file: str | os.PathLike[str] | None,
    options: t.Mapping[str, int],
    env: t.Mapping[str, str],
    here: Path,
    sources: list[str],
    notes: list[str],
) -> dict[str, t.Any]:
    """The sizing settings through gunicorn's classes, layered as `Application.load_config` layers them.

    Raises:
        ImportError: gunicorn is not installed.
    """
    from gunicorn.config import Config  # type: ignore[import-untyped,unused-ignore]

    reader = _reader_class()

    def fresh() -> t.Any:
        app = reader()
        app.cfg.set("workers", web_concurrency or 1)
        return app

    app = fresh()
    cmd_args: dict[str, t.Any] = {}
    if env.get("GUNICORN_CMD_ARGS"):
        try:
            cmd_args = _parse_cmd_args(app.cfg, env["GUNICORN_CMD_ARGS"])
            probe = Config()  # every value checked before any is applied
            for name, value in cmd_args.items():
                probe.set(name, value)
        except Exception as e:
            notes.append(f"GUNICORN_CMD_ARGS not read, gunicorn would refuse it too: {type(e).__name__}: {e}")
            cmd_args = {}
    location: str | os.PathLike[str] | None = config_file or cmd_args.get("config")
    if location is None and (here / _DEFAULT_FILE).is_file():
        location = here / _DEFAULT_FILE
    if location is not None:
        where = _config_location(location, here)
        try:
            app.load_config_from_file(where)
        except Exception as e:
            notes.append(f"could not read {where}: {type(e).__name__}: {e}")
            app = fresh()  # nothing of a file gunicorn would refuse
        else:
            sources.append(where)
    for name, value in cmd_args.items():
        app.cfg.set(name, value)
    if any(name in SIZING_SETTINGS for name in cmd_args):
        sources.append("GUNICORN_CMD_ARGS")
    for name, value in options.items():
        app.cfg.set(name, value)
    cfg = app.cfg
    # worker_class_str: "sync" with threads > 1 is gthread, as gunicorn runs it
    return {
        "workers": cfg.workers,
        "threads": cfg.threads,
        "worker_class": cfg.worker_class_str,
        "worker_connections": cfg.worker_connections,
        "preload": cfg.preload_app,
        "when_ready": f"{getattr(cfg.when_ready, '__module__', '')}.{getattr(cfg.when_ready, '__qualname__', '')}",
    }


def _parse_cmd_args(cfg: t.Any, args: str) -> dict[str, t.Any]:
    """`GUNICORN_CMD_ARGS` through `Config.parser()`: the options it sets, by setting name."""

    def refuse(message: str) -> t.NoReturn:  # argparse would print the usage and exit this process
        raise ValueError(message)

    parser = cfg.parser()
    parser.error = refuse
    parsed = parser.parse_args(shlex.split(args))
    return {name.lower(): v for name, v in vars(parsed).items() if v is not None and name != "args"}


def _reader_class() -> type[t.Any]:
    """A gunicorn `Application` that only holds settings: no app to load, no `sys.argv` to read.

    Raises:
        ImportError: gunicorn is not installed.
    """
    from gunicorn.app.base import Application  # type: ignore[import-untyped,unused-ignore]

    class SettingsReader(Application):  # type: ignore[misc,unused-ignore]
        def load_config(self) -> None:
            """Nothing at construction: `detect_deployment` applies the layers itself."""

        def get_config_from_filename(self, filename: str) -> dict[str, t.Any]:
            return _run_config_file(filename)

    return SettingsReader


def _run_config_file(filename: str) -> dict[str, t.Any]:
    """Run a config file as gunicorn's `Application.get_config_from_filename` does, raising where it exits.

    The file runs as module `__config__` like in gunicorn; the entry it
    takes in `sys.modules` is put back afterwards, as this process goes on.
    """
    if not os.path.exists(filename):
        raise RuntimeError(f"{filename!r} doesn't exist")
    name = "__config__"
    is_python = os.path.splitext(filename)[1] in (".py", ".pyc")
    loader = None if is_python else importlib.machinery.SourceFileLoader(name, filename)
    spec = importlib.util.spec_from_file_location(name, filename, loader=loader)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"{filename!r} cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get(name)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved
    return vars(module)


def _settings_without_gunicorn(
    web_concurrency: int | None,
    config_file: str | os.PathLike[str] | None,
    options: t.Mapping[str, int],
    env: t.Mapping[str, str],
    here: Path,
    notes: list[str],
) -> dict[str, t.Any]:
    """What can be known without gunicorn's classes: `WEB_CONCURRENCY` and the explicit numbers."""
    unread = [
        what
        for what, present in (
            ("GUNICORN_CMD_ARGS", bool(env.get("GUNICORN_CMD_ARGS"))),
            (os.fspath(config_file or ""), config_file is not None),
            (str(here / _DEFAULT_FILE), config_file is None and (here / _DEFAULT_FILE).is_file()),
        )
        if present
    ]
    notes.append(
        "gunicorn is not installed here, so its settings were not read"
        + (f" ({', '.join(unread)})" if unread else "")
        + ": only WEB_CONCURRENCY and --workers/--threads count"
    )
    threads = options.get("threads", 1)
    return {
        "workers": options.get("workers", web_concurrency or 1),
        "threads": threads,
        "worker_class": "gthread" if threads > 1 else "sync",  # gunicorn's rule for the default worker
        "worker_connections": 1000,
    }
