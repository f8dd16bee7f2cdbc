"""vmkernel processor plugin: VM ids, second-stage tables and translated guest memory.

``vmk_processor.plugin`` holds the hook implementations; ``vmk_processor.tables``
builds x86-64-format page tables in an emulated processor's memory.
"""
