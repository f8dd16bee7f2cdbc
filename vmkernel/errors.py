"""Every error vmkernel raises, defined once.

Design: one hierarchy rooted at :class:`VmkError`.  Each error keeps the pieces
of its message as attributes (``thing``, ``value``, ``expected``) so that
callers can react to them without parsing text, and every message names the
thing that was wrong, the value it had and what was expected.  The Rust
extension imports these classes (``pyo3::import_exception!``) instead of
defining its own, so an error looks the same whichever implementation raised
it.  Where a built-in exception type is the natural one to catch, the error
also derives from it (``InvalidArgument`` is a ``ValueError``, ``UnknownResource``
a ``LookupError``), so generic code keeps working.
"""

from __future__ import annotations

import errno
from typing import Any

__all__ = [
    "AttestationError",
    "AuthorizationDenied",
    "BufferLayoutError",
    "CapacityError",
    "ClockError",
    "DuplicateResource",
    "EntropyDenied",
    "FeatureUnavailable",
    "HookFailed",
    "IllegalTransition",
    "InvalidArgument",
    "InvariantViolation",
    "PluginError",
    "ScenarioError",
    "TranslationFault",
    "TrustAuthorityError",
    "UnknownResource",
    "VerifyError",
    "VmkError",
]


def _show(value: Any) -> str:
    """Render a value for a message, truncating huge reprs (1 MB inputs happen)."""
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


class VmkError(Exception):
    """The base of every vmkernel error."""


class InvalidArgument(VmkError, ValueError):
    """A value given to a public entry point is not acceptable.

    ``thing`` names the parameter or field, ``value`` is what was given and
    ``expected`` says what would have been accepted.
    """

    def __init__(self, thing: str, value: Any, expected: str) -> None:
        self.thing = thing
        self.value = value
        self.expected = expected
        super().__init__(f"{thing}: got {_show(value)}, expected {expected}")


class ClockError(InvalidArgument):
    """The simulated clock was asked to move backwards or by a non-integer."""


class BufferLayoutError(InvalidArgument):
    """A batch buffer has the wrong item size, length or bounds."""


class UnknownResource(VmkError, LookupError):
    """No resource of that kind has that id."""

    def __init__(self, kind: str, ident: Any, expected: str = "the id of an existing resource") -> None:
        self.kind = kind
        self.thing = kind
        self.value = ident
        self.expected = expected
        super().__init__(f"{kind} {_show(ident)}: not found, expected {expected}")


class DuplicateResource(VmkError):
    """A resource with that name or id already exists."""

    def __init__(self, kind: str, ident: Any) -> None:
        self.kind = kind
        self.thing = kind
        self.value = ident
        self.expected = f"a {kind} name not already in use"
        super().__init__(f"{kind} {_show(ident)}: already exists, expected {self.expected}")


class IllegalTransition(VmkError):
    """A lifecycle operation is not allowed from the resource's current state."""

    def __init__(self, kind: str, ident: str, state: str, operation: str, allowed: list[str]) -> None:
        self.kind = kind
        self.thing = f"{kind} {ident}"
        self.value = state
        self.operation = operation
        self.allowed = allowed
        self.expected = f"one of {', '.join(allowed)} for {operation}"
        super().__init__(
            f"{kind} {ident}: cannot {operation} in state {state}, expected state {self.expected}"
        )


class CapacityError(VmkError):
    """A request does not fit in what is left (host memory, quota, disk)."""

    def __init__(self, thing: str, value: Any, expected: str) -> None:
        self.thing = thing
        self.value = value
        self.expected = expected
        super().__init__(f"{thing}: needs {_show(value)}, expected at most {expected}")


class AuthorizationDenied(VmkError, PermissionError):
    """The authorization hook denied a principal's operation on a resource."""

    def __init__(self, principal: str, operation: str, resource: str, reasons: list[str]) -> None:
        self.principal = principal
        self.operation = operation
        self.resource = resource
        self.reasons = reasons
        self.thing = f"{operation} on {resource}"
        self.value = principal
        self.expected = "a principal that the loaded policies permit"
        why = "; ".join(reasons) if reasons else "no reason given"
        super().__init__(f"{operation} on {resource} by principal {principal!r}: denied ({why})")


class PluginError(VmkError):
    """A plugin is malformed: a bad hook implementation, a misspelled hook, a failed load."""

    def __init__(self, plugin: str, problem: str, expected: str) -> None:
        self.plugin = plugin
        self.thing = f"plugin {plugin}"
        self.value = problem
        self.expected = expected
        super().__init__(f"plugin {plugin!r}: {problem}, expected {expected}")


class HookFailed(VmkError):
    """A hook implementation raised during an operation; the operation was rolled back.

    The original exception is ``__cause__``.
    """

    def __init__(self, hook: str, operation: str, subject: str, cause: BaseException) -> None:
        self.hook = hook
        self.operation = operation
        self.subject = subject
        self.cause = cause
        self.thing = f"hook {hook}"
        self.value = f"{type(cause).__name__}: {cause}"
        self.expected = "hook implementations that return normally"
        super().__init__(
            f"hook {hook} during {operation} of {subject} raised {self.value}; the operation was rolled back"
        )


class FeatureUnavailable(VmkError):
    """An API needs a plugin that is not loaded."""

    def __init__(self, feature: str, hook: str) -> None:
        self.feature = feature
        self.hook = hook
        self.thing = feature
        self.value = None
        self.expected = f"a loaded plugin implementing {hook}"
        super().__init__(f"{feature}: not available, expected {self.expected}")


class InvariantViolation(VmkError, AssertionError):
    """A named invariant contributed by a plugin does not hold."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        self.thing = f"invariant {name}"
        self.value = detail
        self.expected = "the invariant to hold after every step"
        super().__init__(f"invariant {name} violated: {detail}")


class ScenarioError(VmkError):
    """A scenario script could not be loaded or raised while running."""

    def __init__(self, path: str, problem: str, line: int | None = None) -> None:
        self.path = path
        self.line = line
        self.thing = f"scenario {path}" + (f" line {line}" if line is not None else "")
        self.value = problem
        self.expected = "a Python script that runs to completion"
        super().__init__(f"{self.thing}: {problem}")


# ---------------------------------------------------------------------------
# Fast-path errors, raised by both the Rust extension and the reference models.


class TranslationFault(VmkError):
    """An address translation faulted.

    ``kind`` is one of ``not-present``, ``permission``, ``reserved-bit``,
    ``non-canonical``, ``out-of-memory-range``, ``isolation``,
    ``page-crossing`` (see :data:`FAULT_KINDS`; ``code`` is its index there,
    the value batch calls report); ``stage`` is 1 or 2; ``level`` is the
    page-table level (4 = root … 1 = leaf) where the walk stopped, 0 when the
    address was rejected before any walk.  ``address`` is the address being
    translated; ``gpa`` the guest-physical address a stage-2 walk was
    translating (``None`` for stage 1).
    """

    def __init__(self, kind: str, stage: int, level: int, address: int, gpa: int | None = None) -> None:
        self.kind = kind
        self.stage = stage
        self.level = level
        self.address = address
        self.gpa = gpa
        self.code = FAULT_KINDS.index(kind) if kind in FAULT_KINDS else -1
        self.thing = f"address {address:#x}"
        self.value = kind
        self.expected = "a present mapping that permits the access"
        where = f" (guest-physical {gpa:#x})" if gpa is not None else ""
        super().__init__(f"translation fault at {address:#x}{where}: {kind} at stage {stage}, level {level}")


class VerifyError(VmkError):
    """A threat-rule program failed verification (``code``, ``pc``, ``reason``)."""

    def __init__(self, code: str, pc: int, reason: str) -> None:
        self.code = code
        self.pc = pc
        self.reason = reason
        self.thing = f"program at pc {pc}"
        self.value = code
        self.expected = reason
        super().__init__(f"program rejected at pc {pc}: {code}: {reason}")


# ---------------------------------------------------------------------------
# Confidential VMs: attestation, trust authority, entropy device


class AttestationError(VmkError):
    """Attestation evidence was rejected: nothing was released.

    ``reasons`` lists every failed check as ``(code, detail)`` pairs, with
    codes such as ``SIGNATURE_INVALID`` or ``NONCE_REPLAYED`` (see
    ``docs/confidential.md`` for the full list).
    """

    def __init__(self, subject: str, reasons: list[tuple[str, str]]) -> None:
        self.subject = subject
        self.reasons = reasons
        self.codes = [code for code, _ in reasons]
        self.thing = f"attestation of {subject}"
        self.value = self.codes
        self.expected = "evidence that passes every check of the reference-value policy"
        why = "; ".join(f"{code}: {detail}" for code, detail in reasons) or "no reason given"
        super().__init__(f"attestation of {subject}: rejected ({why}), expected {self.expected}")


class TrustAuthorityError(VmkError):
    """The trust authority could not be reached or answered outside its protocol."""

    def __init__(self, endpoint: str, problem: str, expected: str) -> None:
        self.endpoint = endpoint
        self.thing = f"trust authority {endpoint}"
        self.value = problem
        self.expected = expected
        super().__init__(f"trust authority {endpoint}: {problem}, expected {expected}")


class EntropyDenied(VmkError, PermissionError):
    """The entropy device refused hypervisor data (a reused page address or a repeated page digest)."""

    def __init__(self, vm: str, check: str, value: str) -> None:
        self.vm = vm
        self.check = check
        self.thing = f"entropy page for VM {vm}"
        self.value = value
        self.expected = f"a {check} never used before under this VM's key"
        super().__init__(
            f"entropy page for VM {vm}: {check} {value} was already used, expected {self.expected}"
        )


# ---------------------------------------------------------------------------
# Storage units

__all__ += [
    "BadMagic",
    "CommingleRefused",
    "CorruptUnit",
    "DiskFull",
    "DiskImageError",
    "NbdProtocolError",
    "OwnerMismatch",
    "QuotaExceeded",
    "ReplicaDiverged",
    "StorageError",
    "TruncatedUnit",
    "UnitBusy",
    "UnitDestroyed",
    "UnknownFeature",
]


class StorageError(VmkError):
    """A storage unit refused an operation or found its on-disk state wrong.

    ``unit`` is the unit's owner VM id, ``offset`` the byte offset concerned
    (in the unit image for format problems, in the volume for API calls; the
    message says which), ``value`` what was found and ``expected`` what would
    have been accepted.
    """

    def __init__(self, unit: str, offset: int | None, problem: str, value: Any, expected: str) -> None:
        self.unit = unit
        self.offset = offset
        self.problem = problem
        self.thing = f"storage unit {unit}" + (f" at offset {offset}" if offset is not None else "")
        self.value = value
        self.expected = expected
        super().__init__(f"{self.thing}: {problem} (got {_show(value)}), expected {expected}")


class CorruptUnit(StorageError):
    """A checksum, a record header or an index entry of a unit image is wrong."""


class BadMagic(CorruptUnit):
    """Neither superblock of a unit image carries the unit magic."""


class TruncatedUnit(CorruptUnit):
    """A unit image ends before the data its superblock vouches for."""


class UnknownFeature(StorageError):
    """A unit image uses an incompatible feature this version does not know; it is not opened."""


class OwnerMismatch(StorageError):
    """A unit image, or a record in it, is stamped with another VM than the unit's owner."""


class CommingleRefused(StorageError):
    """A write would put one VM's data into another VM's unit."""


class QuotaExceeded(StorageError):
    """A write would grow a unit past its quota."""


class DiskFull(StorageError):
    """The file system or the network block device under a unit has no space left."""


class UnitDestroyed(StorageError):
    """The unit belongs to a destroyed VM and was being deleted; it cannot be opened."""


class UnitBusy(StorageError):
    """Another process has the unit open for writing."""


class ReplicaDiverged(StorageError):
    """A replica of a unit was written on its own since it was last replicated; it is not overwritten."""


class DiskImageError(InvalidArgument):
    """A raw or qcow2 disk image file cannot be imported into a unit (``path``, byte ``offset``)."""

    def __init__(self, path: str, offset: int | None, problem: str, value: Any, expected: str) -> None:
        self.path = path
        self.offset = offset
        self.problem = problem
        where = f"disk image {path}" + (f" at byte {offset}" if offset is not None else "")
        super().__init__(f"{where}: {problem}", value, expected)


class NbdProtocolError(VmkError, OSError):
    """An NBD server answered outside the protocol: an ``OSError`` with errno ``EPROTO``.

    ``detail`` says what was received and what was expected.
    """

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(errno.EPROTO, f"NBD protocol error: {detail}")

    def __reduce__(self) -> tuple[type[NbdProtocolError], tuple[str]]:
        return type(self), (self.detail,)


# ---------------------------------------------------------------------------
# Processor: fault codes, register access and domain entry faults.

__all__ += ["FAULT_KINDS", "DomainEntryFault", "ProcessorFault", "RegisterAccessFault"]

#: Translation fault kinds by code: ``translate_batch`` reports ``FAULT_KINDS.index(kind)``
#: per address (0 = translated), ``TranslationFault.code`` is the same number.
FAULT_KINDS: tuple[str, ...] = (
    "none",
    "not-present",
    "permission",
    "reserved-bit",
    "non-canonical",
    "out-of-memory-range",
    "isolation",
    "page-crossing",
)

_DOMAIN_NAMES = ("hypervisor", "os", "application")


def _domain_name(domain: int) -> str:
    return _DOMAIN_NAMES[domain] if 0 <= domain < len(_DOMAIN_NAMES) else f"domain {domain}"


class ProcessorFault(VmkError):
    """The emulated processor refused an operation of the running code."""


class RegisterAccessFault(ProcessorFault, PermissionError):
    """A privileged register was read or written from a domain not allowed to.

    ``register`` names it (``vmr``, ``table_root``, ``stage2_root``,
    ``domain_table``), ``domain`` is the current domain (an int),
    ``operation`` is ``read`` or ``write``.  The register is unchanged.
    """

    def __init__(self, register: str, domain: int, operation: str, expected: str) -> None:
        self.register = register
        self.domain = domain
        self.operation = operation
        self.thing = f"register {register}"
        self.value = _domain_name(domain)
        self.expected = expected
        super().__init__(
            f"{operation} of register {register} from the {self.value} domain: denied, expected {expected}"
        )


class DomainEntryFault(ProcessorFault, PermissionError):
    """A domain was entered at an address that is not one of its entry points."""

    def __init__(self, domain: int, address: int, expected: str) -> None:
        self.domain = domain
        self.address = address
        self.thing = f"entry into the {_domain_name(domain)} domain"
        self.value = address
        self.expected = expected
        super().__init__(f"{self.thing} at {address:#x}: denied, expected {expected}")


# ---------------------------------------------------------------------------
# Pre-filter: rule sets and capture files.

__all__ += ["CaptureError", "RuleError"]


class RuleError(InvalidArgument):
    """A pre-filter rule set was rejected; the installed table is unchanged.

    ``where`` locates the problem (``line 3 column 8`` for the text and
    ClassBench formats, ``rules[2].dport`` for JSON); ``line`` and ``column``
    are set (1-based) when the problem has a position in the text.
    """

    def __init__(
        self, where: str, value: Any, expected: str, line: int | None = None, column: int | None = None
    ) -> None:
        self.where = where
        self.line = line
        self.column = column
        super().__init__(f"rules {where}", value, expected)


class CaptureError(InvalidArgument):
    """A pcap / pcapng capture could not be read (``path``, byte ``offset``)."""

    def __init__(self, path: str, offset: int, problem: str, expected: str) -> None:
        self.path = path
        self.offset = offset
        self.problem = problem
        super().__init__(f"capture {path} at byte {offset}", problem, expected)


# ---------------------------------------------------------------------------
# Threat detection engine: rule programs and rule sources.

__all__ += ["RuleCompileError", "VersionMismatch"]


class VersionMismatch(VerifyError):
    """A threat-rule program was built for another version of the program format."""


class RuleCompileError(InvalidArgument):
    """A threat rule (native text or Sigma) could not be compiled into a program.

    ``source`` names the rule text (a path or ``<string>``); ``line`` and
    ``column`` are 1-based when the problem has a position, else None.
    """

    def __init__(
        self, source: str, value: Any, expected: str, line: int | None = None, column: int | None = None
    ) -> None:
        self.source = source
        self.line = line
        self.column = column
        where = f"{source}" + (f" line {line} column {column}" if line is not None else "")
        super().__init__(f"rule {where}", value, expected)
