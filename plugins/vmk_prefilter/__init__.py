"""vmk_prefilter: the packet pre-filter of service insertion as a vmkernel plugin.

Frames leaving a VM's virtual NIC (``Kernel.send_frames``) and frames
delivered to it (``Kernel.deliver_frames``) are steered through the
pre-filter (``vmkernel.fast.Prefilter``) once per batch, classified with
their direction; frames it cannot bypass go to the security component (the
``vmk_security_inspect`` hook), which can program the flow cache so the rest
of an approved flow skips it.
"""

from vmk_prefilter.classbench import classbench_acl, matching_header
from vmk_prefilter.frames import build_frame

__all__ = ["build_frame", "classbench_acl", "matching_header"]
