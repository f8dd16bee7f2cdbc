"""Windows event records as engine events, with the log-source names Sigma rules use.

Design: a record (the JSON form the ``evtx`` parser produces) becomes a flat
event: ``EventData`` / ``UserData`` fields and the ``System`` fields Sigma
rules name (``EventID``, ``Channel``, ``Provider_Name``, ``Computer`` ...).
Its ``type`` is the Sigma category the record belongs to
(``windows/process_creation`` for Sysmon event 1 or Security 4688) and its
``source`` the Sigma service of its channel (``windows/sysmon``), so rules
indexed by either find it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

__all__ = ["SERVICES", "categories_of", "evtx_events", "json_records", "record_to_event"]

#: Channel -> Sigma service name.
SERVICES: dict[str, str] = {
    "Security": "security",
    "System": "system",
    "Application": "application",
    "Microsoft-Windows-Sysmon/Operational": "sysmon",
    "Microsoft-Windows-PowerShell/Operational": "powershell",
    "Windows PowerShell": "powershell-classic",
    "Microsoft-Windows-Windows Defender/Operational": "windefend",
    "Microsoft-Windows-TaskScheduler/Operational": "taskscheduler",
    "Microsoft-Windows-WMI-Activity/Operational": "wmi",
    "Microsoft-Windows-Bits-Client/Operational": "bits-client",
    "Microsoft-Windows-DNS-Client/Operational": "dns-client",
    "Microsoft-Windows-CodeIntegrity/Operational": "codeintegrity-operational",
    "Microsoft-Windows-NTLM/Operational": "ntlm",
    "Microsoft-Windows-Windows Firewall With Advanced Security/Firewall": "firewall-as",
    "Microsoft-Windows-TerminalServices-LocalSessionManager/Operational": (
        "terminalservices-localsessionmanager"
    ),
    "Microsoft-Windows-SMBClient/Security": "smbclient-security",
    "Microsoft-Windows-LSA/Operational": "lsa-server",
    "Microsoft-Windows-Shell-Core/Operational": "shell-core",
    "OpenSSH/Operational": "openssh",
    "Microsoft-Windows-DriverFrameworks-UserMode/Operational": "driver-framework",
    "Microsoft-Windows-AppXDeploymentServer/Operational": "appxdeployment-server",
    "Microsoft-Windows-AppXPackaging/Operational": "appxpackaging-om",
    "Microsoft-Windows-Diagnosis-Scripted/Operational": "diagnosis-scripted",
    "Microsoft-Windows-Kernel-EventTracing/Admin": "kernel-event-tracing",
    "Microsoft-Windows-Security-Mitigations/KernelMode": "security-mitigations",
    "Microsoft-Windows-Security-Mitigations/UserMode": "security-mitigations",
    "Microsoft-Windows-Ldap-Client/Debug": "ldap",
    "Microsoft-Windows-PrintService/Admin": "printservice-admin",
    "Microsoft-Windows-PrintService/Operational": "printservice-operational",
    "Microsoft-Windows-SmbClient/Security": "smbclient-security",
    "Microsoft-Windows-Hyper-V-Worker-Admin": "hyper-v-worker",
    "Microsoft-Windows-VHDMP/Operational": "vhdmp",
    "Microsoft-Windows-Kernel-PnP/Configuration": "kernel-pnp",
    "Microsoft-Windows-Microsoft-Windows-AppLocker/EXE and DLL": "applocker",
    "Microsoft-Windows-AppLocker/EXE and DLL": "applocker",
    "Microsoft-Windows-AppLocker/MSI and Script": "applocker",
    "Microsoft-Windows-AppLocker/Packaged app-Deployment": "applocker",
    "Microsoft-Windows-AppLocker/Packaged app-Execution": "applocker",
    "Microsoft-Windows-Sysmon": "sysmon",
    "Microsoft-Windows-Windows Defender/WHC": "windefend",
}

_SYSMON = {
    1: ["process_creation"],
    2: ["file_change"],
    3: ["network_connection"],
    4: ["sysmon_status"],
    5: ["process_termination"],
    6: ["driver_load"],
    7: ["image_load"],
    8: ["create_remote_thread"],
    9: ["raw_access_thread"],
    10: ["process_access"],
    11: ["file_event"],
    12: ["registry_add", "registry_delete", "registry_event"],
    13: ["registry_set", "registry_event"],
    14: ["registry_rename", "registry_event"],
    15: ["create_stream_hash"],
    16: ["sysmon_status"],
    17: ["pipe_created"],
    18: ["pipe_created"],
    19: ["wmi_event"],
    20: ["wmi_event"],
    21: ["wmi_event"],
    22: ["dns_query"],
    23: ["file_delete"],
    24: ["clipboard_change"],
    25: ["process_tampering"],
    26: ["file_delete_detected", "file_delete"],
    27: ["file_block_executable"],
    28: ["file_block_shredding"],
    29: ["file_executable_detected"],
    255: ["sysmon_error"],
}


def categories_of(channel: str, event_id: int | None, data: Mapping[str, Any]) -> list[str]:
    """Sigma categories of a record (first is the primary)."""
    if SERVICES.get(channel) == "sysmon" and isinstance(event_id, int):
        cats = list(_SYSMON.get(event_id, []))
        if event_id == 12 and isinstance(data.get("EventType"), str):
            cats = ["registry_delete" if "Delete" in data["EventType"] else "registry_add", "registry_event"]
        return cats
    if channel == "Security" and event_id == 4688:
        return ["process_creation"]
    if SERVICES.get(channel) == "powershell":
        return {4104: ["ps_script"], 4103: ["ps_module"]}.get(event_id or 0, [])
    if channel == "Windows PowerShell":
        return {
            400: ["ps_classic_start"],
            600: ["ps_classic_provider_start"],
            800: ["ps_classic_script"],
        }.get(event_id or 0, [])
    return []


def _time_ns(system: Mapping[str, Any]) -> int:
    created = system.get("TimeCreated")
    stamp = created.get("#attributes", {}).get("SystemTime") if isinstance(created, Mapping) else None
    if not isinstance(stamp, str):
        return 0
    try:
        dt = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return 0
    return int(dt.timestamp()) * 10**9 + dt.microsecond * 1000


def _flat(value: Any) -> Any:
    if isinstance(value, Mapping):
        text = value.get("#text")
        return _flat(text) if text is not None else None
    return value


def record_to_event(record: Mapping[str, Any]) -> dict[str, Any]:
    """One evtx JSON record (``{"Event": {...}}``) as an engine event."""
    ev = record.get("Event", record)
    system = ev.get("System", {}) or {}
    event_id = _flat(system.get("EventID"))
    channel = _flat(system.get("Channel")) or ""
    out: dict[str, Any] = {}
    data = ev.get("EventData") or {}
    if isinstance(data, Mapping):
        for k, v in data.items():
            if k != "#attributes":
                out[k] = _flat(v)
                if " " in k:  # Defender writes "Threat Name"; Sigma rules say ThreatName
                    out.setdefault(k.replace(" ", ""), out[k])
    user = ev.get("UserData")
    if isinstance(user, Mapping):
        for inner in user.values():
            if isinstance(inner, Mapping):
                for k, v in inner.items():
                    if k != "#attributes":
                        out.setdefault(k, _flat(v))
    provider = system.get("Provider", {})
    attrs = provider.get("#attributes", {}) if isinstance(provider, Mapping) else {}
    out.update(
        {
            "EventID": event_id,
            "Channel": channel,
            "Provider_Name": attrs.get("Name"),
            "Computer": _flat(system.get("Computer")),
            "Level": _flat(system.get("Level")),
            "Task": _flat(system.get("Task")),
            "Keywords": _flat(system.get("Keywords")),
            "EventRecordID": _flat(system.get("EventRecordID")),
        }
    )
    service = SERVICES.get(channel, "channel:" + channel)
    cats = categories_of(channel, event_id if isinstance(event_id, int) else None, out)
    out["type"] = "windows/" + (cats[0] if cats else service)
    out["source"] = "windows/" + service
    if len(cats) > 1:
        out["categories"] = cats
    out["time_ns"] = _time_ns(system)
    return out


def evtx_events(path: str) -> Iterator[dict[str, Any]]:
    """Events of a Windows ``.evtx`` file, in record order (needs the ``evtx`` package)."""
    import json

    from evtx import PyEvtxParser

    for rec in PyEvtxParser(str(path)).records_json():
        if rec is not None:
            yield record_to_event(json.loads(rec["data"]))


def json_records(text: str) -> list[dict[str, Any]]:
    """Records of an evtx JSON dump: one object, a list, or objects one after another."""
    import json

    dec = json.JSONDecoder()
    out: list[dict[str, Any]] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return out
        obj, pos = dec.raw_decode(text, pos)
        out.extend(obj if isinstance(obj, list) else [obj])
