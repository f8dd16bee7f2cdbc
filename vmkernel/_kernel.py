"""The kernel: one plugin manager, one registry, one clock, one journal.

Design notes.

* Every public operation runs inside ``_operation``: it authorizes the
  principal through ``vmk_authorize``, opens an undo log in the registry and
  an event buffer, runs the kernel's own change and the plugins' hooks, and
  then either commits (events appended to the journal and broadcast through
  ``vmk_event``) or rolls everything back, tells every plugin through
  ``vmk_rollback`` and journals one ``op.failed`` event.  Operations nest: a
  plugin that stops a VM from inside another operation joins that
  operation's fate.
* Events are broadcast after the journal holds them, from a queue, so that
  observers that react with new operations never reorder the broadcast.
* Determinism: ids come from an RNG stream derived from the seed; time comes
  from the simulated clock; nothing reads the wall clock.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import tempfile
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pluggy

from vmkernel._clock import Clock
from vmkernel._journal import Event, Journal
from vmkernel._plugins import PluginInfo, build_plugin_manager, call_impl, describe_plugins
from vmkernel._resources import (
    VM,
    Container,
    Disk,
    Host,
    Image,
    Link,
    Network,
    Principal,
    Registry,
)
from vmkernel._results import Decision, Effect, Invariant, ReportSection
from vmkernel._stash import Stash
from vmkernel.enums import VMState
from vmkernel.errors import (
    AuthorizationDenied,
    FeatureUnavailable,
    HookFailed,
    IllegalTransition,
    InvalidArgument,
    PluginError,
    UnknownResource,
    VmkError,
)

__all__ = ["Kernel"]


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_MAX_MEMORY_MIB = 1 << 24  # 16 TiB: larger than any host we emulate
_MAX_VCPUS = 1024
_MAX_SEED = 2**64

#: The principal that API calls act as when none is named.
DEFAULT_PRINCIPAL = "operator"
#: The principal for what the kernel and its plugins do on their own (lease reclaim, rule actions).
KERNEL_PRINCIPAL = "kernel"

# Which states each VM operation may start from.
_VM_FROM: dict[str, tuple[VMState, ...]] = {
    "launch": (VMState.CREATED, VMState.STOPPED),
    "stop": (VMState.RUNNING,),
    "destroy": (VMState.CREATED, VMState.STOPPED),
}


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgument(
            f"{kind} name", name, "1-63 characters of letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    return name


def _check_int(thing: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(thing, value, f"an int between {low} and {high}")
    if not low <= value <= high:
        raise InvalidArgument(thing, value, f"an int between {low} and {high}")
    return value


# (time_ns, kind, subject, data JSON, data snapshot, durable: kept even when the operation rolls back)
_Record = tuple[int, str, str, bytes, Mapping[str, Any], bool]


class _Pending:
    """Events of an open operation, not yet in the journal."""

    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: list[_Record] = []


class Kernel:
    """A virtualization host cluster and its management plane, driven from Python.

    :param seed: seeds every random choice the kernel and its plugins make
        (``0 <= seed < 2**64``).  Same seed and same calls give the same journal.
    :param data_dir: where plugins keep state (storage units, stores,
        certificates).  ``None`` makes a temporary directory that
        :meth:`close` removes.
    :param plugins: plugin objects or modules to register explicitly.
    :param autoload: load plugins from the ``vmkernel`` entry-point group;
        ``None`` means yes unless ``VMKERNEL_DISABLE_PLUGIN_AUTOLOAD`` is set.
    :param block: plugin names never to register (also ``VMKERNEL_BLOCK_PLUGINS``).
    :param config: free-form settings that plugins read (``kernel.config``).
    """

    def __init__(
        self,
        seed: int = 0,
        data_dir: str | Path | None = None,
        *,
        plugins: Iterable[Any] | None = None,
        autoload: bool | None = None,
        block: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.seed = _check_int("seed", seed, 0, _MAX_SEED - 1)
        if config is not None and not isinstance(config, Mapping):
            raise InvalidArgument("config", config, "a mapping of setting names to values")
        if plugins is not None and (isinstance(plugins, str | bytes) or not isinstance(plugins, Iterable)):
            raise InvalidArgument("plugins", plugins, "a list of plugin objects or modules")
        self._owns_data_dir = data_dir is None
        if data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="vmkernel-"))
        else:
            if not isinstance(data_dir, str | Path):
                raise InvalidArgument("data_dir", data_dir, "a str or pathlib.Path directory")
            path = Path(data_dir)
            if path.exists() and not path.is_dir():
                raise InvalidArgument("data_dir", str(path), "a directory (this path is a file)")
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InvalidArgument(
                    "data_dir", str(path), f"a directory that can be created ({exc.strerror})"
                ) from None
            self.data_dir = path
        self._closed = False
        try:
            self._start(plugins, autoload, block, config)
        except BaseException:
            self._closed = True
            self._cleanup_dir()
            raise

    def _start(
        self,
        plugins: Iterable[Any] | None,
        autoload: bool | None,
        block: Sequence[str],
        config: Mapping[str, Any] | None,
    ) -> None:
        self.config: dict[str, Any] = dict(config or {})
        self.stash = Stash()
        self.rng = self.rng_for("kernel")
        self._ids = self.rng_for("kernel.ids")
        self.registry = Registry()
        self.clock = Clock(self._on_clock_advance)
        self.journal = Journal()
        self._pending: list[_Pending] = []
        self._broadcast_queue: deque[Event] = deque()
        self._broadcasting = False
        self._destroyed: dict[str, int] = {}
        self.pm: pluggy.PluginManager = build_plugin_manager(plugins, autoload=autoload, block=block)
        self.hook = self.pm.hook
        # Configure inside the start operation: nothing is broadcast before every
        # plugin has set up its state, and a failing configure leaves no events.
        with self._operation("kernel.start", "kernel", KERNEL_PRINCIPAL, authorize=False):
            for name in (KERNEL_PRINCIPAL, DEFAULT_PRINCIPAL):
                self.registry.add(Principal(name, ("admin",)))
            self.emit("kernel.start", "kernel", seed=self.seed, plugins=[p.name for p in self.plugins()])
            try:
                self.hook.vmk_configure(kernel=self)
            except VmkError:
                raise
            except Exception as exc:
                raise PluginError(
                    "vmk_configure", f"{type(exc).__name__}: {exc}", "a configure hook that succeeds"
                ) from exc

    # ------------------------------------------------------------------ basics
    def rng_for(self, name: str) -> random.Random:
        """An independent random stream for ``name``, derived from the seed.

        Plugins take their own stream so that loading one plugin never shifts
        the random choices of another.
        """
        if not isinstance(name, str):
            raise InvalidArgument("rng stream name", name, "a str naming the stream, e.g. the plugin's name")
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        return random.Random(int.from_bytes(digest[:16], "little"))

    def new_id(self) -> str:
        """A fresh UUID (version 4 layout) from the kernel's seeded id stream."""
        return str(uuid.UUID(int=self._ids.getrandbits(128), version=4))

    def plugins(self) -> list[PluginInfo]:
        """Every loaded plugin: its name, where it came from and the hooks it implements."""
        return describe_plugins(self.pm)

    def has_plugin(self, name: str) -> bool:
        return self.pm.get_plugin(name) is not None

    def close(self) -> None:
        """Unconfigure plugins and remove a temporary data directory.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        failures: list[tuple[str, Exception]] = []
        try:
            for impl in self.hook.vmk_unconfigure.get_hookimpls()[::-1]:
                try:
                    call_impl(impl, kernel=self)
                except Exception as exc:  # every plugin must get the chance to release its resources
                    failures.append((impl.plugin_name, exc))
        finally:
            self._cleanup_dir()
        if failures:
            name, first = failures[0]
            raise PluginError(
                name,
                f"vmk_unconfigure raised {type(first).__name__}: {first}",
                "an unconfigure hook that returns normally",
            ) from first

    def _cleanup_dir(self) -> None:
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Kernel(seed={self.seed}, now_ns={self.clock.now_ns}, vms={self.registry.count('vm')}, "
            f"events={len(self.journal)})"
        )

    # ------------------------------------------------------------------ events
    def emit(self, kind: str, subject: str, **data: Any) -> None:
        """Record a state change as a journal event.

        Inside an operation the event commits with it (or vanishes on
        rollback); outside one it is committed at once.  ``data`` must be
        JSON-serialisable: anything else raises :class:`InvalidArgument` here,
        at the call, not later when the journal is written.  The event keeps
        a snapshot of ``data``: changing the dict afterwards changes nothing.
        """
        self._emit(kind, subject, data, durable=False)

    def _emit(self, kind: str, subject: str, data: Mapping[str, Any], *, durable: bool) -> None:
        if self._closed:
            raise InvalidArgument("kernel", "closed", "an open kernel (this one was closed)")
        if not isinstance(kind, str) or not kind:
            raise InvalidArgument("event kind", kind, "a non-empty str such as 'vm.launch'")
        if not isinstance(subject, str):
            raise InvalidArgument("event subject", subject, "a str resource id")
        try:
            data_json = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
        except TypeError as exc:
            raise InvalidArgument(
                f"data of event {kind}", data, f"JSON-serialisable values ({exc})"
            ) from None
        record = (self.clock.now_ns, kind, subject, data_json, orjson.loads(data_json), durable)
        if self._pending:
            self._pending[-1].events.append(record)
        else:
            self._commit([record])

    def _commit(self, records: list[_Record]) -> None:
        journal = self.journal
        for time_ns, kind, subject, data_json, data, _durable in records:
            event = journal._append(time_ns, kind, subject, data_json, data)
            self._broadcast_queue.append(event)
        self._drain_broadcast()

    def _drain_broadcast(self) -> None:
        if self._broadcasting:
            return  # the outer loop delivers these, in journal order
        self._broadcasting = True
        try:
            queue = self._broadcast_queue
            observers = self.hook.vmk_event.get_hookimpls()[::-1]  # pluggy's order: last registered first
            if not observers:
                queue.clear()
                return
            while queue:
                event = queue.popleft()
                # Each observer on its own: one failing never hides the event from the
                # others, and a failure on a plugin.error event is not reported again.
                for impl in observers:
                    try:
                        call_impl(impl, kernel=self, event=event)
                    except Exception as exc:
                        if event.kind != "plugin.error":
                            self.emit(
                                "plugin.error",
                                event.subject,
                                event=event.kind,
                                hook="vmk_event",
                                plugin=impl.plugin_name,
                                error=f"{type(exc).__name__}: {exc}",
                            )
        finally:
            self._broadcasting = False

    # -------------------------------------------------------------- operations
    def principal(self, ref: str | Principal | None) -> Principal:
        """Resolve a principal name (``None`` means the default ``operator``)."""
        if ref is None:
            ref = DEFAULT_PRINCIPAL
        if isinstance(ref, Principal):
            ref = ref.id
        if not isinstance(ref, str):
            raise InvalidArgument("principal", ref, "a principal name or None")
        found = self.registry.find("principal", ref)
        if found is None:
            raise UnknownResource("principal", ref, "a principal added with add_principal()")
        return found  # type: ignore[no-any-return]

    def authorize(self, principal: str | Principal | None, operation: str, resource: str) -> list[Decision]:
        """Ask every ``vmk_authorize`` implementation; raise :class:`AuthorizationDenied` on any deny.

        Decisions combine deny-overrides.  With no policy plugin there are no
        decisions and the request is allowed.  A denial is journaled with its reasons.
        """
        who = self.principal(principal)
        if not self.hook.vmk_authorize.get_hookimpls():
            return []  # no policy plugin: allow, without the cost of a hook call
        try:
            answers = self.hook.vmk_authorize(
                kernel=self, principal=who, operation=operation, resource=resource
            )
        except VmkError:
            raise
        except Exception as exc:  # an evaluation error is a deny, and it is recorded
            reason = f"policy evaluation failed: {type(exc).__name__}: {exc}"
            self._emit(
                "auth.denied",
                resource,
                {"principal": who.id, "operation": operation, "reasons": [reason]},
                durable=True,
            )
            raise HookFailed("vmk_authorize", operation, resource, exc) from exc
        decisions = [d for d in answers if d is not None]
        for d in decisions:
            if not isinstance(d, Decision):
                raise PluginError("vmk_authorize", f"returned {d!r}", "a vmkernel.Decision or None")
        denials = [d for d in decisions if d.effect is Effect.DENY]
        if denials:
            reasons = [f"{d.reason} [{d.source}]" if d.source else d.reason for d in denials]
            self._emit(
                "auth.denied",
                resource,
                {"principal": who.id, "operation": operation, "reasons": reasons},
                durable=True,
            )
            raise AuthorizationDenied(who.id, operation, resource, reasons)
        return decisions

    @contextmanager
    def _operation(
        self, operation: str, subject: str, principal: str | Principal | None, *, authorize: bool = True
    ) -> Iterator[None]:
        if self._closed:
            raise InvalidArgument("kernel", "closed", "an open kernel (this one was closed)")
        if authorize:
            self.authorize(principal, operation, subject)
        outer = self.registry.begin()
        pending = _Pending()
        self._pending.append(pending)
        try:
            yield
        except BaseException as exc:
            self._pending.pop()
            self.registry.end(outer, commit=False)
            # Durable records (auth denials) survive, stamped with the time after
            # the rollback so that the journal stays ordered in time.
            now = self.clock.now_ns
            kept = [(min(r[0], now), *r[1:]) for r in pending.events if r[5]]
            if kept:
                if self._pending:
                    self._pending[-1].events.extend(kept)
                else:
                    self._commit(kept)
            self._rolled_back(operation, subject, exc)
            raise
        self._pending.pop()
        self.registry.end(outer, commit=True)
        if self._pending:
            self._pending[-1].events.extend(pending.events)
        else:
            self._commit(pending.events)

    def _rolled_back(self, operation: str, subject: str, exc: BaseException) -> None:
        for impl in reversed(self.hook.vmk_rollback.get_hookimpls()):
            try:
                call_impl(impl, kernel=self, operation=operation, subject=subject, error=exc)
            except Exception as err:
                self.emit(
                    "plugin.error",
                    subject,
                    hook="vmk_rollback",
                    plugin=impl.plugin_name,
                    error=f"{type(err).__name__}: {err}",
                )
        self.emit("op.failed", subject, operation=operation, error=f"{type(exc).__name__}: {exc}")

    def _call(self, hook: str, operation: str, subject: str, **kwargs: Any) -> list[Any]:
        """Call a veto-able hook: a typed vmkernel error passes through, anything else becomes HookFailed."""
        try:
            return getattr(self.hook, hook)(kernel=self, **kwargs)  # type: ignore[no-any-return]
        except VmkError:
            raise
        except Exception as exc:
            raise HookFailed(hook, operation, subject, exc) from exc

    def _on_clock_advance(self, old_ns: int, new_ns: int) -> None:
        with self._operation("clock.advance", "clock", KERNEL_PRINCIPAL, authorize=False):
            self.clock._set(new_ns)
            self.registry.log_undo(lambda: self.clock._set(old_ns))
            self.emit("clock.advance", "clock", from_ns=old_ns)
            self._call("vmk_tick", "clock.advance", "clock", now_ns=new_ns)

    def update(self, resource: Any, **fields: Any) -> None:
        """Change fields of a resource so that a rollback can restore them (for plugins)."""
        for name, value in fields.items():
            if not hasattr(resource, name):
                raise InvalidArgument("field", name, f"a field of {type(resource).__name__}")
            self.registry.set(resource, name, value)

    # --------------------------------------------------------------- lookups
    def _lookup(self, kind: str, ref: object) -> Any:
        if hasattr(ref, "kind") and getattr(ref, "kind", None) == kind:
            ref = ref.id  # type: ignore[attr-defined]
        if not isinstance(ref, str):
            raise InvalidArgument(f"{kind} reference", ref, f"a {kind} handle, id or name")
        found = self.registry.find(kind, ref)
        if found is None:
            if kind == "vm" and ref in self._destroyed:
                raise UnknownResource(
                    "vm", ref, f"a live VM (this one was destroyed at {self._destroyed[ref]} ns)"
                )
            raise UnknownResource(kind, ref)
        return found

    def vm(self, ref: VM | str) -> VM:
        """The VM with that handle, id or name."""
        return self._lookup("vm", ref)  # type: ignore[no-any-return]

    def vms(self) -> list[VM]:
        return self.registry.all("vm")

    def host(self, ref: Host | str) -> Host:
        return self._lookup("host", ref)  # type: ignore[no-any-return]

    def hosts(self) -> list[Host]:
        return self.registry.all("host")

    def container(self, ref: Container | str) -> Container:
        return self._lookup("container", ref)  # type: ignore[no-any-return]

    def containers(self) -> list[Container]:
        return self.registry.all("container")

    def disk(self, ref: Disk | str) -> Disk:
        return self._lookup("disk", ref)  # type: ignore[no-any-return]

    def disks(self) -> list[Disk]:
        return self.registry.all("disk")

    def image(self, ref: Image | str) -> Image:
        return self._lookup("image", ref)  # type: ignore[no-any-return]

    def images(self) -> list[Image]:
        return self.registry.all("image")

    def network(self, ref: Network | str) -> Network:
        return self._lookup("network", ref)  # type: ignore[no-any-return]

    def networks(self) -> list[Network]:
        return self.registry.all("network")

    def link(self, ref: Link | str) -> Link:
        return self._lookup("link", ref)  # type: ignore[no-any-return]

    def links(self) -> list[Link]:
        return self.registry.all("link")

    def principals(self) -> list[Principal]:
        return self.registry.all("principal")

    # -------------------------------------------------------------- cluster
    def add_principal(
        self, name: str, roles: Sequence[str] = (), *, principal: str | None = None
    ) -> Principal:
        """Register someone who can ask for operations (policy plugins decide what they may do)."""
        _check_name("principal", name)
        if not isinstance(roles, list | tuple) or not all(isinstance(r, str) for r in roles):
            raise InvalidArgument("roles", roles, "a list of role names")
        p = Principal(name, tuple(roles))
        with self._operation("principal.add", f"principal:{name}", principal):
            self.registry.add(p)
            self.emit("principal.add", f"principal:{name}", roles=list(p.roles))
        return p

    def add_host(
        self, name: str, memory_mib: int = 262_144, cpus: int = 64, *, principal: str | None = None
    ) -> Host:
        """A host joins the cluster (``vmk_host_join``)."""
        _check_name("host", name)
        _check_int("memory_mib", memory_mib, 1, _MAX_MEMORY_MIB)
        _check_int("cpus", cpus, 1, _MAX_VCPUS)
        host = Host(name, name, memory_mib, cpus)
        with self._operation("host.join", f"host:{name}", principal):
            self.registry.add(host)
            self.emit("host.join", f"host:{name}", memory_mib=memory_mib, cpus=cpus)
            self._call("vmk_host_join", "host.join", f"host:{name}", host=host)
        return host

    def remove_host(self, ref: Host | str, *, principal: str | None = None) -> None:
        """A host leaves the cluster (``vmk_host_leave``; a plugin may refuse)."""
        host = self.host(ref)
        with self._operation("host.leave", f"host:{host.id}", principal):
            self._call("vmk_host_leave", "host.leave", f"host:{host.id}", host=host)
            self.registry.remove(host)
            self.emit("host.leave", f"host:{host.id}")

    # ------------------------------------------------------------ VM life
    def create_vm(
        self,
        name: str,
        memory_mib: int = 64,
        vcpus: int = 1,
        *,
        principal: str | None = None,
        **options: Any,
    ) -> VM:
        """Define a new VM in state ``CREATED``.

        Extra keyword ``options`` (for example ``confidential=True``) are
        recorded on the VM and passed to ``vmk_vm_create``; they must be
        JSON-serialisable.  A plugin may place the VM on a host or veto it.
        """
        _check_name("vm", name)
        _check_int("memory_mib", memory_mib, 1, _MAX_MEMORY_MIB)
        _check_int("vcpus", vcpus, 1, _MAX_VCPUS)
        try:
            orjson.dumps(options)
        except TypeError as exc:
            raise InvalidArgument("create_vm options", options, f"JSON-serialisable values ({exc})") from None
        owner = self.principal(principal).id
        vm = VM(
            self.new_id(),
            name,
            memory_mib,
            vcpus,
            VMState.CREATED,
            self.clock.now_ns,
            options=dict(options),
            owner=owner,
        )
        subject = f"vm:{vm.id}"
        with self._operation("vm.create", subject, principal):
            self.registry.add(vm)
            self._call("vmk_vm_create", "vm.create", subject, vm=vm, options=vm.options)
            self.emit(
                "vm.create",
                subject,
                name=name,
                memory_mib=memory_mib,
                vcpus=vcpus,
                options=vm.options,
                host=vm.host_id,
                owner=owner,
            )
        return vm

    def _transition(self, vm: VM, op: str) -> None:
        allowed = _VM_FROM[op]
        if vm.state not in allowed:
            raise IllegalTransition("vm", vm.id, vm.state.value, op, [s.value for s in allowed])

    def launch_vm(self, ref: VM | str, *, principal: str | None = None) -> VM:
        """Start a VM that is ``CREATED`` or ``STOPPED``."""
        vm = self.vm(ref)
        self._transition(vm, "launch")
        subject = f"vm:{vm.id}"
        with self._operation("vm.launch", subject, principal):
            self.registry.set(vm, "state", VMState.RUNNING)
            self._call("vmk_vm_launch", "vm.launch", subject, vm=vm)
            self.emit("vm.launch", subject, host=vm.host_id)
        return vm

    def stop_vm(self, ref: VM | str, *, principal: str | None = None) -> VM:
        """Stop a ``RUNNING`` VM."""
        vm = self.vm(ref)
        self._transition(vm, "stop")
        subject = f"vm:{vm.id}"
        with self._operation("vm.stop", subject, principal):
            self.registry.set(vm, "state", VMState.STOPPED)
            self._call("vmk_vm_stop", "vm.stop", subject, vm=vm)
            self.emit("vm.stop", subject)
        return vm

    def destroy_vm(self, ref: VM | str, *, force: bool = False, principal: str | None = None) -> None:
        """Destroy a VM that is not running (``force=True`` stops it first, in the same operation)."""
        vm = self.vm(ref)
        subject = f"vm:{vm.id}"
        if not (force and vm.state is VMState.RUNNING):
            self._transition(vm, "destroy")
        with self._operation("vm.destroy", subject, principal):
            if vm.state is VMState.RUNNING:
                self.stop_vm(vm, principal=principal)
            for disk in self.disks():
                if disk.attached_to == vm.id:
                    self.detach_disk(vm, disk, principal=principal)
            self.registry.set(vm, "state", VMState.DESTROYED)
            self.registry.remove(vm)
            self._call("vmk_vm_destroy", "vm.destroy", subject, vm=vm)
            self.emit("vm.destroy", subject)
        self._destroyed[vm.id] = self.clock.now_ns

    # ------------------------------------------------------------ containers
    def launch_container(
        self, host: Host | str, name: str, image: str = "app", *, principal: str | None = None, **options: Any
    ) -> Container:
        """A host OS launches a containerized application (``vmk_container_launch``)."""
        h = self.host(host)
        _check_name("container", name)
        if not isinstance(image, str) or not image:
            raise InvalidArgument("image", image, "a non-empty image name")
        c = Container(self.new_id(), name, h.id, image, "running", dict(options))
        subject = f"container:{c.id}"
        with self._operation("container.launch", subject, principal):
            self.registry.add(c)
            self._call("vmk_container_launch", "container.launch", subject, container=c)
            self.emit("container.launch", subject, name=name, host=h.id, image=image, options=c.options)
        return c

    def stop_container(self, ref: Container | str, *, principal: str | None = None) -> Container:
        """A containerized application stops (``vmk_container_stop``)."""
        c = self.container(ref)
        if c.state != "running":
            raise IllegalTransition("container", c.id, c.state, "stop", ["running"])
        subject = f"container:{c.id}"
        with self._operation("container.stop", subject, principal):
            self.registry.set(c, "state", "stopped")
            self._call("vmk_container_stop", "container.stop", subject, container=c)
            self.emit("container.stop", subject)
        return c

    # -------------------------------------------------------------- networks
    def create_network(self, name: str, vni: int | None = None, *, principal: str | None = None) -> Network:
        """A virtual network, optionally an overlay segment with a 24-bit VNI."""
        _check_name("network", name)
        if vni is not None:
            _check_int("vni", vni, 0, 2**24 - 1)
        net = Network(name, name, vni)
        with self._operation("network.create", f"network:{name}", principal):
            self.registry.add(net)
            self.emit("network.create", f"network:{name}", vni=vni)
        return net

    def add_link(self, name: str, a: str, b: str, *, principal: str | None = None) -> Link:
        """A link between two sites, whose samples reach ``vmk_link_sample``."""
        _check_name("link", name)
        for end, value in (("a", a), ("b", b)):
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f"link end {end}", value, "a non-empty site name")
        link = Link(name, a, b)
        with self._operation("link.add", f"link:{name}", principal):
            self.registry.add(link)
            self.emit("link.add", f"link:{name}", a=a, b=b)
        return link

    def link_sample(self, ref: Link | str, **sample: Any) -> None:
        """Deliver one measurement of a link (``latency_ns``, ``bandwidth_bps``, ``loss`` …)."""
        link = self.link(ref)
        sample.setdefault("time_ns", self.clock.now_ns)
        with self._operation("link.sample", f"link:{link.id}", KERNEL_PRINCIPAL, authorize=False):
            self._call("vmk_link_sample", "link.sample", f"link:{link.id}", link=link, sample=sample)

    def _frames_call(
        self, ref: VM | str, frames: Sequence[bytes], nic: int, *, hook: str, operation: str, verb: str
    ) -> list[Any]:
        """One batch of frames through one hook, inside one operation (the two directions share it)."""
        vm = self.vm(ref)
        if vm.state is not VMState.RUNNING:
            raise IllegalTransition("vm", vm.id, vm.state.value, verb, [VMState.RUNNING.value])
        _check_int("nic", nic, 0, 255)
        if isinstance(frames, bytes | bytearray | str) or not isinstance(frames, Sequence):
            raise InvalidArgument("frames", type(frames).__name__, "a sequence of frames (bytes each)")
        for i, frame in enumerate(frames):
            if not isinstance(frame, bytes | bytearray):
                raise InvalidArgument(f"frames[{i}]", type(frame).__name__, "a frame as bytes or bytearray")
        subject = f"vm:{vm.id}"
        with self._operation(operation, subject, KERNEL_PRINCIPAL, authorize=False):
            results = self._call(hook, operation, subject, vm=vm, nic=nic, frames=frames)
        return [r for r in results if r is not None]

    def send_frames(self, ref: VM | str, frames: Sequence[bytes], nic: int = 0) -> list[Any]:
        """A batch of frames leaves ``nic`` of a running VM; returns each plugin's result."""
        return self._frames_call(
            ref, frames, nic, hook="vmk_frames_out", operation="net.send", verb="send frames"
        )

    def deliver_frames(self, ref: VM | str, frames: Sequence[bytes], nic: int = 0) -> list[Any]:
        """A batch of frames arrives at ``nic`` of a running VM; returns each plugin's result.

        The mirror of :meth:`send_frames`: same checks, one ``vmk_frames_in``
        call per batch inside a ``net.deliver`` operation.
        """
        return self._frames_call(
            ref, frames, nic, hook="vmk_frames_in", operation="net.deliver", verb="deliver frames"
        )

    # ----------------------------------------------------------- disks, images
    def register_image(self, name: str, *, principal: str | None = None, **meta: Any) -> Image:
        """A base image that disks can derive from."""
        _check_name("image", name)
        img = Image(name, name, dict(meta))
        with self._operation("image.register", f"image:{name}", principal):
            self.registry.add(img)
            self.emit("image.register", f"image:{name}", meta=img.meta)
        return img

    def replace_image(self, old: Image | str, new: Image | str, *, principal: str | None = None) -> None:
        """Replace base image ``old`` by ``new`` (``vmk_image_replace``)."""
        o, n = self.image(old), self.image(new)
        if o is n:
            raise InvalidArgument("new image", n.id, "an image other than the one replaced")
        with self._operation("image.replace", f"image:{o.id}", principal):
            self.registry.set(o, "state", "replaced")
            self._call("vmk_image_replace", "image.replace", f"image:{o.id}", old=o, new=n)
            self.emit("image.replace", f"image:{o.id}", new=n.id)

    def create_disk(
        self,
        name: str,
        size_bytes: int,
        base_image: Image | str | None = None,
        *,
        principal: str | None = None,
    ) -> Disk:
        """A virtual disk, empty or derived from a base image (``vmk_disk_create``)."""
        _check_name("disk", name)
        _check_int("size_bytes", size_bytes, 512, 2**50)
        img = self.image(base_image) if base_image is not None else None
        disk = Disk(self.new_id(), name, size_bytes, img.id if img else None)
        subject = f"disk:{disk.id}"
        with self._operation("disk.create", subject, principal):
            self.registry.add(disk)
            self._call("vmk_disk_create", "disk.create", subject, disk=disk, base_image=img)
            self.emit("disk.create", subject, name=name, size_bytes=size_bytes, base_image=disk.base_image_id)
        return disk

    def clone_disk(self, ref: Disk | str, name: str, *, principal: str | None = None) -> Disk:
        """A new disk with the same contents (``vmk_disk_clone``)."""
        src = self.disk(ref)
        _check_name("disk", name)
        clone = Disk(self.new_id(), name, src.size_bytes, src.base_image_id)
        subject = f"disk:{clone.id}"
        with self._operation("disk.clone", subject, principal):
            self.registry.add(clone)
            self._call("vmk_disk_clone", "disk.clone", subject, source=src, clone=clone)
            self.emit("disk.clone", subject, name=name, source=src.id)
        return clone

    def attach_disk(self, vm: VM | str, disk: Disk | str, *, principal: str | None = None) -> None:
        """Attach a free disk to a VM (``vmk_disk_attach``)."""
        v, d = self.vm(vm), self.disk(disk)
        if d.attached_to is not None:
            raise IllegalTransition("disk", d.id, f"attached to vm {d.attached_to}", "attach", ["detached"])
        subject = f"disk:{d.id}"
        with self._operation("disk.attach", subject, principal):
            self.registry.set(d, "attached_to", v.id)
            self._call("vmk_disk_attach", "disk.attach", subject, vm=v, disk=d)
            self.emit("disk.attach", subject, vm=v.id)

    def detach_disk(self, vm: VM | str, disk: Disk | str, *, principal: str | None = None) -> None:
        """Detach a disk from the VM it is attached to (``vmk_disk_detach``)."""
        v, d = self.vm(vm), self.disk(disk)
        if d.attached_to != v.id:
            raise IllegalTransition(
                "disk", d.id, f"attached to {d.attached_to}", "detach", [f"attached to {v.id}"]
            )
        subject = f"disk:{d.id}"
        with self._operation("disk.detach", subject, principal):
            self.registry.set(d, "attached_to", None)
            self._call("vmk_disk_detach", "disk.detach", subject, vm=v, disk=d)
            self.emit("disk.detach", subject, vm=v.id)

    # ---------------------------------------------------------- configuration
    def apply_config(
        self, target: str, settings: Sequence[Mapping[str, Any]], *, principal: str | None = None
    ) -> list[Any]:
        """Settings from a device manager arrive for ``target`` (``vmk_config_receive``)."""
        if not isinstance(target, str) or not target:
            raise InvalidArgument("target", target, "a host or container id")
        if not isinstance(settings, list | tuple) or not all(isinstance(s, Mapping) for s in settings):
            raise InvalidArgument("settings", settings, "a list of setting mappings")
        with self._operation("config.receive", target, principal):
            results = self._call(
                "vmk_config_receive", "config.receive", target, target=target, settings=settings
            )
        return [r for r in results if r is not None]

    # --------------------------------------------------- features from plugins
    def _query(self, hook: str, **kwargs: Any) -> Any:
        """Call a query hook; a plugin's plain exception becomes a typed PluginError."""
        try:
            return getattr(self.hook, hook)(kernel=self, **kwargs)
        except VmkError:
            raise
        except Exception as exc:
            raise PluginError(
                hook, f"raised {type(exc).__name__}: {exc}", "a hook that returns normally"
            ) from exc

    def _first(self, hook: str, feature: str, **kwargs: Any) -> Any:
        result = self._query(hook, **kwargs)
        if result is None:
            raise FeatureUnavailable(feature, hook)
        return result

    def guest_memory(self, ref: VM | str) -> Any:
        """The guest-physical memory of a VM (needs a processor plugin)."""
        return self._first("vmk_guest_memory", "guest memory", vm=self.vm(ref))

    def hypervisor_write(self, ref: VM | str, gpa: int, data: bytes) -> None:
        """The hypervisor writes into a VM's memory; encrypted pages get raw bytes."""
        vm = self.vm(ref)
        _check_int("gpa", gpa, 0, 2**64 - 1)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidArgument("data", type(data).__name__, "bytes")
        handled = self._query("vmk_hypervisor_write", vm=vm, gpa=gpa, data=bytes(data))
        if not handled:
            self.guest_memory(vm).write(gpa, bytes(data))

    def storage_unit(self, ref: VM | str) -> Any:
        """The storage unit holding a VM's state (needs a storage plugin)."""
        vm_id = ref.id if isinstance(ref, VM) else ref
        if not isinstance(vm_id, str):
            raise InvalidArgument("vm reference", ref, "a VM handle or id")
        if self.registry.find("vm", vm_id) is not None:
            vm_id = self.registry.find("vm", vm_id).id
        return self._first("vmk_storage_unit", "storage units", vm_id=vm_id)

    def storage_units(self) -> list[Any]:
        """Every storage unit under the data directory, live VMs or not."""
        return list(self._first("vmk_storage_units", "storage units"))

    def save_vm(self, ref: VM | str, *, principal: str | None = None) -> Any:
        """Save a VM's definition and every plugin's part of its state into its storage unit."""
        vm = self.vm(ref)
        unit = self.storage_unit(vm)
        subject = f"vm:{vm.id}"
        with self._operation("vm.save", subject, principal):
            unit.write_config(vm.to_config())
            self._call("vmk_vm_save", "vm.save", subject, vm=vm, unit=unit)
            unit.flush()
            self.emit("vm.save", subject)
        return unit

    def restore_vm(self, unit_or_id: Any, *, principal: str | None = None) -> VM:
        """Bring a saved VM back (state ``STOPPED``, same id) from its storage unit."""
        unit = self.storage_unit(unit_or_id) if isinstance(unit_or_id, str | VM) else unit_or_id
        if not hasattr(unit, "read_config"):
            raise InvalidArgument("unit", unit_or_id, "a storage unit or a VM id with one")
        config = unit.read_config()
        try:
            vm = VM(
                str(config["id"]),
                config["name"],
                int(config["memory_mib"]),
                int(config["vcpus"]),
                VMState.STOPPED,
                self.clock.now_ns,
                options=dict(config.get("options", {})),
                owner=str(config.get("owner", DEFAULT_PRINCIPAL)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument("saved VM config", config, f"a config written by save_vm ({exc})") from None
        subject = f"vm:{vm.id}"
        with self._operation("vm.restore", subject, principal):
            self.registry.add(vm)
            destroyed_at = self._destroyed.pop(vm.id, None)
            if destroyed_at is not None:
                self.registry.log_undo(lambda: self._destroyed.__setitem__(vm.id, destroyed_at))
            self._call("vmk_vm_restore", "vm.restore", subject, vm=vm, unit=unit)
            self.emit("vm.restore", subject, name=vm.name, memory_mib=vm.memory_mib)
        return vm

    def identity(self, ref: VM | str) -> Any:
        """The identity certificate attestation provisioned to a confidential VM."""
        return self._first("vmk_vm_identity", "VM identity", vm=self.vm(ref))

    def entropy(self, ref: VM | str) -> Any:
        """A VM's entropy device (``.read(n)``)."""
        return self._first("vmk_entropy_device", "entropy device", vm=self.vm(ref))

    # ------------------------------------------------------ testing, reporting
    def invariants(self) -> list[Invariant]:
        """The kernel's own invariants and every plugin's."""
        found: list[Invariant] = [
            Invariant("kernel.vm-states", self._check_vm_states),
            Invariant("kernel.journal-order", self._check_journal_order),
        ]
        for contributed in self._query("vmk_invariants"):
            for inv in contributed or ():
                if not isinstance(inv, Invariant):
                    raise PluginError("vmk_invariants", f"returned {inv!r}", "vmkernel.Invariant objects")
                found.append(inv)
        return found

    def check_invariants(self) -> None:
        """Run every invariant; raise :class:`InvariantViolation` for the first that fails."""
        from vmkernel.errors import InvariantViolation

        for inv in self.invariants():
            problem = inv.check()
            if problem is not None:
                raise InvariantViolation(inv.name, problem)

    def _check_vm_states(self) -> str | None:
        """The registry's VM states equal a replay of the journal's lifecycle events."""
        replay: dict[str, str] = {}
        to_state = {
            "vm.create": "created",
            "vm.launch": "running",
            "vm.stop": "stopped",
            "vm.restore": "stopped",
        }
        for e in self.journal:
            if e.kind in to_state:
                replay[e.subject[3:]] = to_state[e.kind]
            elif e.kind == "vm.destroy":
                replay.pop(e.subject[3:], None)
        live = {vm.id: vm.state.value for vm in self.vms()}
        if live != replay:
            diff = {
                k: (live.get(k), replay.get(k))
                for k in set(live) | set(replay)
                if live.get(k) != replay.get(k)
            }
            return f"registry vs journal replay differ (registry, journal): {diff}"
        return None

    def _check_journal_order(self) -> str | None:
        last = -1
        for i, e in enumerate(self.journal):
            if e.seq != i:
                return f"event {i} has seq {e.seq}"
            if e.time_ns < last:
                return f"event {i} at {e.time_ns} ns is older than the one before ({last} ns)"
            last = e.time_ns
        return None

    def report(self) -> list[ReportSection]:
        """The kernel's own summary and every plugin's report section."""
        counts = {kind: self.registry.count(kind) for kind in ("host", "vm", "container", "disk", "network")}
        states: dict[str, int] = {}
        for vm in self.vms():
            states[vm.state.value] = states.get(vm.state.value, 0) + 1
        lines = [
            f"seed {self.seed}, simulated time {self.clock.now_ns} ns",
            "resources: " + ", ".join(f"{n} {k}s" for k, n in counts.items()),
            "VM states: " + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"),
            f"journal: {len(self.journal)} events, digest {self.journal.digest()[:16]}",
        ]
        sections = [ReportSection("kernel", lines)]
        sections.extend(s for s in self._query("vmk_report") if s is not None)
        return sections
