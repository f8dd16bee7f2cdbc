"""A ready-made attestation setup outside any kernel, for scripts, tests and benchmarks.

Design: :class:`Lab` wires one emulated vendor, one security module per host,
a reference policy for the built-in launch image and a trust authority on a
clock the caller moves by hand.  :meth:`Lab.launch` gives a measured guest with
its agent; :meth:`Lab.evidence` produces the evidence a guest would send for a
fresh challenge, which tests then damage to build bad inputs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .authority import Challenge, Evidence, TrustAuthority
from .certs import Vendor
from .memory import EncryptionMode
from .plugin import default_policy
from .policy import ReferencePolicy
from .provision import GuestAgent
from .psp import LaunchImage, SecurityModule, guest_policy
from .service import InProcessTransport

__all__ = ["Clock", "Lab"]


@dataclass
class Clock:
    """A hand-driven nanosecond clock."""

    now_ns: int = 0

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, ns: int) -> None:
        self.now_ns += ns


@dataclass
class Lab:
    """Vendor, hosts, policy and trust authority; seeded keys when ``seed`` is given."""

    seed: int | None = None
    hosts: int = 1
    generation: str = "Milan"
    clock: Clock = field(default_factory=Clock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed) if self.seed is not None else None
        self.vendor = Vendor(rng=self._rng)
        self.modules = [
            SecurityModule(f"host-{i}", self.vendor, generation=self.generation, rng=self._rng)
            for i in range(self.hosts)
        ]
        self.policy: ReferencePolicy = default_policy(self.vendor, max_vcpus=4)
        self.authority = TrustAuthority(self.policy, clock=self.clock, rng=self._rng)
        self.transport = InProcessTransport(self.authority)
        self._count = 0

    @property
    def module(self) -> SecurityModule:
        return self.modules[0]

    def launch(
        self,
        *,
        debug: bool = False,
        migrate_ma: bool = False,
        mode: EncryptionMode = EncryptionMode.SNP,
        host: int = 0,
        host_data: bytes = bytes(32),
        image: LaunchImage | None = None,
    ) -> GuestAgent:
        """A measured guest (launch finished) and its attestation agent."""
        self._count += 1
        module = self.modules[host]
        ctx = module.launch_start(
            f"guest-{self._count}",
            policy=guest_policy(debug=debug, migrate_ma=migrate_ma),
            mode=mode,
            host_data=host_data,
        )
        module.launch_image(ctx, image or LaunchImage())
        return GuestAgent(ctx, module, rng=self._rng)

    def challenge(self, workload: str = "workload") -> Challenge:
        return self.transport.request(workload)

    def evidence(self, agent: GuestAgent, workload: str = "workload", *, vmpl: int = 0) -> Evidence:
        return agent.evidence(self.challenge(workload), vmpl=vmpl)
