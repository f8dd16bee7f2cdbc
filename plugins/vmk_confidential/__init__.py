"""Confidential VMs for vmkernel: memory encryption, SEV-SNP attestation, identity, entropy.

Design: the package is a library first and a plugin second.  The library
modules work without a kernel:

- :mod:`.memory`: the AES-XTS memory encryption engine over a page store;
- :mod:`.measure`: the SEV-SNP launch digest;
- :mod:`.report`: the 1184-byte attestation report layout;
- :mod:`.certs`: the ARK -> ASK -> VCEK hierarchy (emulated vendor);
- :mod:`.psp`: the host security module (keys, measured launch, reports);
- :mod:`.policy` and :mod:`.verify`: reference values and verification;
- :mod:`.authority` and :mod:`.service`: the trust authority and its HTTP API;
- :mod:`.provision`: the guest's side (sealed secret, identity certificate);
- :mod:`.entropy` and :mod:`.quality`: the entropy device and its assessment;
- :mod:`.lab`: a ready-made setup for scripts and tests.

:mod:`.plugin` wires them into a kernel (entry point ``confidential``).
"""
