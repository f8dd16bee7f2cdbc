"""Reference-value policy: what a trust authority accepts, kept in a JSON file.

Design: the policy holds only reference values (allowed launch measurements,
the minimum TCB, the debug/migration/VMPL/host-data rules and one pinned ARK
per CPU generation, as PEM) and the nonce lifetime.  Roots are pinned here and
never taken from the evidence: a chain is trusted only if its ASK is signed by
the pinned root of the VCEK's generation.  Unknown keys in the file are an
error, so a misspelled rule is never silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vmkernel.errors import InvalidArgument

from .report import Tcb

__all__ = ["DEFAULT_NONCE_TTL_NS", "ReferencePolicy"]

DEFAULT_NONCE_TTL_NS = 30_000_000_000  # 30 s of kernel time
_KEYS = {
    "allowed_measurements",
    "minimum_tcb",
    "allow_debug",
    "allow_migrate_ma",
    "allowed_vmpls",
    "allowed_host_data",
    "pinned_roots",
    "nonce_ttl_ns",
}


def _hex_set(name: str, values: Iterable[Any], size: int) -> frozenset[bytes]:
    out = set()
    for value in values:
        try:
            raw = bytes.fromhex(str(value))
        except ValueError:
            raw = b""
        if len(raw) != size:
            raise InvalidArgument(name, value, f"a hex string of {size} bytes")
        out.add(raw)
    return frozenset(out)


@dataclass(frozen=True)
class ReferencePolicy:
    """The reference values evidence is judged against."""

    allowed_measurements: frozenset[bytes]
    pinned_roots: Mapping[str, x509.Certificate]
    minimum_tcb: Tcb = field(default_factory=Tcb)
    allow_debug: bool = False
    allow_migrate_ma: bool = False
    allowed_vmpls: frozenset[int] = frozenset({0})
    allowed_host_data: frozenset[bytes] = frozenset({bytes(32)})
    nonce_ttl_ns: int = DEFAULT_NONCE_TTL_NS
    _pin_der: Mapping[str, bytes] = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.nonce_ttl_ns <= 0:
            raise InvalidArgument("nonce_ttl_ns", self.nonce_ttl_ns, "a positive number of nanoseconds")
        pins = {
            gen: cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            for gen, cert in self.pinned_roots.items()
        }
        object.__setattr__(self, "_pin_der", pins)

    def pinned_key(self, generation: str) -> bytes | None:
        """The pinned root's public key (SubjectPublicKeyInfo DER): a root is its key."""
        return self._pin_der.get(generation)

    def with_measurements(self, *measurements: bytes) -> ReferencePolicy:
        return replace(self, allowed_measurements=self.allowed_measurements | frozenset(measurements))

    # -- file form ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed_measurements": sorted(m.hex() for m in self.allowed_measurements),
            "minimum_tcb": self.minimum_tcb.as_dict(),
            "allow_debug": self.allow_debug,
            "allow_migrate_ma": self.allow_migrate_ma,
            "allowed_vmpls": sorted(self.allowed_vmpls),
            "allowed_host_data": sorted(h.hex() for h in self.allowed_host_data),
            "pinned_roots": {
                gen: cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
                for gen, cert in sorted(self.pinned_roots.items())
            },
            "nonce_ttl_ns": self.nonce_ttl_ns,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferencePolicy:
        unknown = set(data) - _KEYS
        if unknown:
            raise InvalidArgument("policy keys", sorted(unknown), f"only {sorted(_KEYS)}")
        for required in ("allowed_measurements", "pinned_roots"):
            if required not in data:
                raise InvalidArgument("policy", sorted(data), f"a policy with {required!r}")
        roots: dict[str, x509.Certificate] = {}
        for gen, pem in dict(data["pinned_roots"]).items():
            try:
                roots[str(gen)] = x509.load_pem_x509_certificate(str(pem).encode("ascii"))
            except ValueError as exc:
                raise InvalidArgument(f"pinned_roots[{gen!r}]", str(pem)[:40], "a PEM certificate") from exc
        tcb = dict(data.get("minimum_tcb", {}))
        extra = set(tcb) - {"bootloader", "tee", "snp", "microcode"}
        if extra:
            raise InvalidArgument("minimum_tcb keys", sorted(extra), "bootloader, tee, snp, microcode")
        vmpls = frozenset(int(v) for v in data.get("allowed_vmpls", [0]))
        if any(not 0 <= v <= 3 for v in vmpls):
            raise InvalidArgument("allowed_vmpls", sorted(vmpls), "VMPLs in 0..3")
        return cls(
            allowed_measurements=_hex_set("allowed_measurements", data["allowed_measurements"], 48),
            pinned_roots=roots,
            minimum_tcb=Tcb(**{k: int(v) for k, v in tcb.items()}),
            allow_debug=bool(data.get("allow_debug", False)),
            allow_migrate_ma=bool(data.get("allow_migrate_ma", False)),
            allowed_vmpls=vmpls,
            allowed_host_data=_hex_set("allowed_host_data", data.get("allowed_host_data", ["00" * 32]), 32),
            nonce_ttl_ns=int(data.get("nonce_ttl_ns", DEFAULT_NONCE_TTL_NS)),
        )

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ReferencePolicy:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidArgument("policy file", str(path), f"a readable JSON policy file ({exc})") from exc
        if not isinstance(data, dict):
            raise InvalidArgument("policy file", str(path), "a JSON object")
        return cls.from_dict(data)
