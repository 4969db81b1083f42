"""A model repository served the way TF Serving serves one: every model, its version policy, its labels, new
versions picked up while serving.

Each model is a *source*: a base path of integer version directories, a version policy and version labels, read
from a ``ModelServerConfig`` (TF Serving's ``--model_config_file``, parsed with its own proto) or from the folders
themselves. :meth:`Repository.poll` does what TF Serving's file-system source and AspiredVersionsManager do on each
poll: list every base path, ask the policy which versions it wants, load each new one (checked against its manifest
and the signature contract first; a version that fails is refused with one log line and never served), and unload
the versions the policy no longer wants once their in-flight requests are done. New versions load before old ones
are unloaded, so a model never goes without a servable (TF Serving's availability-preserving policy). Every request
holds its version for its whole life (:meth:`Repository.acquire`).

A version's state is TF Serving's: LOADING, AVAILABLE, UNLOADING, END (a refused version is END with its error).
A refused version is tried again only once its files change (a half-written version, once complete, is served).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from crossport.errors import ConfigError, CrossportError, ManifestError
from crossport.files import fingerprint
from export.publish import SERVING_ROOT

log = logging.getLogger("crossport.serve")

LOADING, AVAILABLE, UNLOADING, END = "LOADING", "AVAILABLE", "UNLOADING", "END"


class ServingError(Exception):
    """A request TF Serving would refuse: ``code`` is the ``grpc.StatusCode`` name it answers with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Policy:
    """TF Serving's ``ServableVersionPolicy``: the newest ``latest`` versions (its default is 1), the ``specific``
    ones, or ``all``."""

    latest: int = 1
    specific: tuple[int, ...] = ()
    all: bool = False

    def choose(self, candidates: list[int]) -> list[int]:
        """The versions wanted among ``candidates`` (sorted)."""
        if self.all:
            return list(candidates)
        if self.specific:
            return [number for number in candidates if number in self.specific]
        return list(candidates[-self.latest:])

    def __str__(self) -> str:
        if self.all:
            return "all versions"
        if self.specific:
            return "version" + ("s " if len(self.specific) > 1 else " ") + ", ".join(map(str, self.specific))
        return "the newest version" if self.latest == 1 else f"the newest {self.latest} versions"


@dataclass(frozen=True)
class ModelSource:
    name: str
    base: Path
    policy: Policy = Policy()
    labels: dict[str, int] = field(default_factory=dict)


def read_model_config(path: Path, serving_root: str = SERVING_ROOT) -> list[ModelSource]:
    """The models of a ``ModelServerConfig`` text file, as TF Serving reads ``--model_config_file``. A base path
    under ``serving_root`` (where TF Serving's container mounts the repository, as crossport's own models.config
    writes it) is read from the config's folder; any other is used as it stands."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from export.publish import base_path_here

    path = Path(path)
    try:
        text = path.read_text()
        config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except OSError as error:
        raise ConfigError(f"--model-config-file {path} cannot be read ({error.strerror or error}).",
                          hint="Pass the models.config a publish wrote, e.g. models/models.config.") from None
    except (text_format.ParseError, UnicodeDecodeError) as error:
        raise ConfigError(f"--model-config-file {path} is not a TF Serving ModelServerConfig: {error}.",
                          hint="Write it in protobuf text format: model_config_list { config { name: ... "
                               "base_path: ... } }.") from None
    entries = config.model_config_list.config
    if not entries:
        raise ConfigError(f"--model-config-file {path} lists no models (expected model_config_list {{ config "
                          "{ ... } }).", hint="List each model with its name and base_path.")
    sources, seen = [], set()
    for entry in entries:
        where = f"--model-config-file {path}: model {entry.name!r}"
        if not entry.name or not entry.base_path:
            raise ConfigError(f"{where} needs both a name and a base_path.", hint="Give every config entry both.")
        if entry.name in seen:
            raise ConfigError(f"{where} is listed twice.", hint="Give each model one entry.")
        seen.add(entry.name)
        if entry.model_platform not in ("", "tensorflow"):
            raise ConfigError(f"{where} has model_platform {entry.model_platform!r}; only 'tensorflow' is served.",
                              hint="Set model_platform: \"tensorflow\".")
        sources.append(ModelSource(entry.name, base_path_here(entry.base_path, path.parent, serving_root),
                                   _policy(entry.model_version_policy, where), dict(entry.version_labels)))
    return sources


def config_reader(path: Path, serving_root: str = SERVING_ROOT,
                  every: float = 0) -> Callable[[], list[ModelSource]]:
    """The models of ``path`` for each poll: read now (a bad config raises, in one line), and again whenever it
    changed and ``every`` seconds have passed since the last read (TF Serving's
    ``--model_config_file_poll_wait_seconds``; 0: never). A config that breaks later is logged and the models
    already read go on being served, as TF Serving keeps its config when a new one fails."""
    path = Path(path)
    state = {"sources": read_model_config(path, serving_root), "at": time.monotonic(), "stamp": _stamp(path)}

    def discover() -> list[ModelSource]:
        if every > 0 and time.monotonic() - state["at"] >= every:
            state["at"] = time.monotonic()
            stamp = _stamp(path)
            if stamp != state["stamp"]:
                state["stamp"] = stamp
                try:
                    state["sources"] = read_model_config(path, serving_root)
                    log.info("re-read %s: %s", path, ", ".join(source.name for source in state["sources"]))
                except ConfigError as error:
                    log.error("kept the models already served: %s", error)
        return state["sources"]

    return discover


def _stamp(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _policy(proto, where: str) -> Policy:
    kind = proto.WhichOneof("policy_choice")
    if kind == "specific":
        numbers = tuple(sorted(set(proto.specific.versions)))
        if not numbers:
            raise ConfigError(f"{where} has a specific version policy with no versions.",
                              hint="List them: model_version_policy { specific { versions: 1 } }.")
        return Policy(specific=numbers)
    if kind == "all":
        return Policy(all=True)
    count = proto.latest.num_versions if kind == "latest" else 1
    if count < 1:  # TF Serving: "num_versions must be greater than 0"
        raise ConfigError(f"{where} asks for the latest {count} versions.",
                          hint="num_versions must be at least 1.")
    return Policy(latest=count)


def sources_at(path: Path, version: int | None = None) -> Callable[[], list[ModelSource]]:
    """What a path on the command line serves, as a function the manager calls on every poll: a version directory
    (that version), a model directory (its newest version, or ``version``) or a repository (every model folder in
    it, each its newest version; a model published later is picked up too)."""
    from export.publish import versions

    path = Path(path)
    if (path / "saved_model.pb").is_file() and path.name.isdigit():
        if version is not None and version != int(path.name):
            raise ConfigError(f"{path} is version {path.name}, but --version {version} was given.",
                              hint="Pass the model directory with --version, or the version directory alone.")
        source = ModelSource(path.parent.name, path.parent, Policy(specific=(int(path.name),)))
        return lambda: [source]
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory.", hint="Pass a model repository (e.g. models), a model's "
                                                               "directory (models/emnist_mlp) or one version.")
    available = versions(path)
    if available:
        if version is not None and version not in available:
            raise ConfigError(f"{path} has no version {version}: found {available}.", hint="Pick one with --version.")
        source = ModelSource(path.name, path, Policy(specific=(version,)) if version is not None else Policy())
        return lambda: [source]
    if version is not None:
        raise ConfigError(f"--version {version} names one version, but {path} is a repository of models.",
                          hint="Pass one model's directory with --version, or a models.config with a specific "
                               "version policy.")

    def models() -> list[ModelSource]:
        return [ModelSource(child.name, child) for child in sorted(path.iterdir())
                if child.is_dir() and not child.name.startswith(".") and versions(child)]

    if not models():
        raise ConfigError(f"{path} has no published versions (integer directories) and no model folders holding "
                          "them.", hint="Pass <models-dir> or <models-dir>/<name>, e.g. models/emnist_mlp, after "
                                        "a run has published.")
    return models


@dataclass
class Version:
    number: int
    path: Path
    state: str = LOADING
    servable: object | None = None
    error: CrossportError | None = None
    code: str = "OK"  # the status TF Serving reports with the state
    in_flight: int = 0
    files: tuple = ()  # fingerprint of a refused version: it is tried again once this changes


class Repository:
    """The versions being served, and the polling that keeps them what the policies want.

    ``discover()`` lists the models (called on every poll); ``load(name, number, directory)`` makes the servable
    of a checked version (None: versions are checked, not loaded, as a ``--workers`` supervisor checks them).
    ``allow_changed``: serve a version whose files no longer match its manifest (logged)."""

    def __init__(self, discover: Callable[[], list[ModelSource]], load: Callable[[str, int, Path], object] | None, *,
                 allow_changed: bool = False, who: str = "") -> None:
        self._who = who  # what each log line starts with (a --workers worker's "worker N: ")
        self._discover = discover
        self._load = load
        self._allow_changed = allow_changed
        self._lock = threading.Lock()
        self._sources: dict[str, ModelSource] = {}
        self._models: dict[str, dict[int, Version]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what is served ---------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return sorted(self._sources)

    def served(self, name: str) -> list[int]:
        """The AVAILABLE versions of ``name``."""
        return sorted(n for n, v in self._models.get(name, {}).items() if v.state == AVAILABLE)

    @contextlib.contextmanager
    def acquire(self, name: str, version: int | None = None, label: str | None = None) -> Iterator[object]:
        """The servable a request names, held until the request is done (an unloading version waits for it). As
        TF Serving resolves a request: a version label through the model's ``version_labels``; no version, the
        newest AVAILABLE one."""
        entry = self._resolve(name, version, label)
        try:
            yield entry.servable
        finally:
            with self._lock:
                entry.in_flight -= 1
                if entry.state == UNLOADING and entry.in_flight == 0:
                    self._unloaded(name, entry)

    def _resolve(self, name: str, version: int | None, label: str | None) -> Version:
        with self._lock:
            source, model = self._sources.get(name), self._models.get(name, {})
            if source is None:
                raise ServingError("NOT_FOUND", f"Servable not found for request: Latest({name})")
            if label:
                if label not in source.labels:
                    raise ServingError("INVALID_ARGUMENT", f"Unrecognized servable version label: {label}")
                version = source.labels[label]
            if version is None:
                available = [n for n, v in model.items() if v.state == AVAILABLE]
                if not available:
                    raise ServingError("NOT_FOUND", f"Servable not found for request: Latest({name})")
                version = max(available)
            entry = model.get(version)
            if entry is None or entry.state != AVAILABLE:
                serving = ", ".join(map(str, sorted(n for n, v in model.items() if v.state == AVAILABLE)))
                raise ServingError("NOT_FOUND", f"Servable not found for request: Specific({name}, {version}) "
                                                f"({name} version {version} is not served; serving: "
                                                f"{serving or 'none'})")
            entry.in_flight += 1
            return entry

    def status(self, name: str, version: int | None = None) -> list[Version]:
        """Every version of ``name`` the server has known, newest first, as TF Serving's GetModelStatus lists them."""
        with self._lock:
            if name not in self._sources:
                raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
            model = self._models.get(name, {})
            if version is not None:
                if version not in model:
                    raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name}")
                return [model[version]]
            return [model[number] for number in sorted(model, reverse=True)]

    # --- polling ----------------------------------------------------------------------------

    def poll(self) -> None:
        """One pass over every base path: load what the policies want and is new, unload what they dropped."""
        from export.publish import versions

        sources = {source.name: source for source in self._discover()}
        for name in set(self._sources) - set(sources):  # a model gone from the repository or the config
            self._drop(name, [])
        with self._lock:
            self._sources = dict(sources)
        for source in sources.values():
            model = self._models.setdefault(source.name, {})
            on_disk = versions(source.base)
            while True:  # a refused version leaves the candidates, and the policy chooses again
                wanted = source.policy.choose([n for n in on_disk if not self._refused(model.get(n))])
                missing = [n for n in wanted if n not in model or model[n].state == END]
                if not missing:
                    break
                for number in missing:
                    self._load_version(source, number)
            # only now, with the new versions loaded, are the ones the policy dropped unloaded
            self._drop(source.name, wanted)

    def start(self, interval: float) -> None:
        """Poll every ``interval`` seconds in a thread (TF Serving's ``--file_system_poll_wait_seconds``; 0: the
        first poll, already done, is the only one)."""
        if interval <= 0:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.poll()
                except Exception:  # a poll that fails (a folder unreadable for a moment) must not stop the next
                    log.exception("polling the model repository failed")

        self._thread = threading.Thread(target=loop, name="crossport-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _refused(self, entry: Version | None) -> bool:
        """A version refused before whose files have not changed since (one that did is tried again)."""
        return entry is not None and entry.error is not None and fingerprint(entry.path) == entry.files

    def _load_version(self, source: ModelSource, number: int) -> None:
        path = source.base / str(number)
        entry = Version(number, path, files=fingerprint(path))
        with self._lock:
            self._models[source.name][number] = entry
        log.info("%sloading %s version %d from %s", self._who, source.name, number, path)
        started = time.perf_counter()
        try:
            self._check(path)
            servable = self._load(source.name, number, path) if self._load is not None else None
        except CrossportError as error:
            self._refuse(source.name, entry, error, "DATA_LOSS" if isinstance(error, ManifestError)
                         else "FAILED_PRECONDITION")
            return
        except Exception as error:  # a load that fails in a library: refused with what it said, never served
            self._refuse(source.name, entry, CrossportError(f"{path} cannot be loaded: {error}"), "UNKNOWN")
            return
        with self._lock:
            entry.servable, entry.state = servable, AVAILABLE
        log.info("%s%s %s version %d (%s in %.2f s)", self._who, "checked" if self._load is None else "serving",
                 source.name, number, "checked" if self._load is None else "checked and loaded",
                 time.perf_counter() - started)

    def _check(self, path: Path) -> None:
        """The version against its manifest (every file's sha256) and TF Serving's and crossport's signature
        contract, before anything of it is loaded."""
        from crossport.errors import PackageError
        from export.contract import signature_class_count
        from export.servable import signature_problems
        from export.verify import check_version

        checked = check_version(path)
        if not checked.ok:
            problems = "; ".join(checked.problems)
            if not self._allow_changed:
                raise ManifestError(f"{path} no longer matches its manifest: {problems}.",
                                    hint="Check it with python -m pipelines.lineage, serve another version, or pass "
                                         "--allow-changed to serve it anyway.")
            log.warning("serving %s although it no longer matches its manifest: %s", path, problems)
        # the classes its own signature declares (labels.txt is checked against what it answers, once loaded)
        problems = signature_problems(path, signature_class_count(path))
        if problems:
            raise PackageError(f"{path} breaks the signature contract: {'; '.join(problems)}.",
                               hint="Re-publish it; this version cannot be served.")

    def _refuse(self, name: str, entry: Version, error: CrossportError, code: str) -> None:
        with self._lock:
            entry.state, entry.error, entry.code = END, error, code
        log.error("%srefused %s version %d: %s", self._who, name, entry.number, error)

    def _drop(self, name: str, keep: list[int]) -> None:
        """Unload every AVAILABLE version of ``name`` not in ``keep``: at once if no request holds it, else when
        the last one is done."""
        with self._lock:
            for entry in self._models.get(name, {}).values():
                if entry.state == AVAILABLE and entry.number not in keep:
                    entry.state = UNLOADING
                    log.info("%sunloading %s version %d", self._who, name, entry.number)
                    if entry.in_flight == 0:
                        self._unloaded(name, entry)

    def _unloaded(self, name: str, entry: Version) -> None:
        entry.servable, entry.state = None, END
        log.info("%sunloaded %s version %d", self._who, name, entry.number)

    def first_error(self) -> CrossportError | None:
        """After the first poll: why a model has nothing to serve (its newest refusal), or None."""
        for name in self.names:
            if not self.served(name):
                refused = [v for v in self._models.get(name, {}).values() if v.error is not None]
                if refused:
                    return max(refused, key=lambda v: v.number).error
                return ConfigError(f"{self._sources[name].base} has no version that its policy "
                                   f"({self._sources[name].policy}) serves.",
                                   hint="Publish one, or change the version policy in the models.config.")
        return None
