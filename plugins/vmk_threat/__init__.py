"""vmk_threat: behavioral threat detection on the kernel's journal and external event streams."""
