"""The committed stubs are exactly what proto/ generates; the contract has what the issue promises."""

from __future__ import annotations

from facefleet import contract
from facefleet.v1 import admin_pb2, agent_pb2, scheduler_pb2, types_pb2


def test_committed_stubs_match_proto() -> None:
    assert contract.drift() == [], "run `facefleet proto gen` and commit the stubs"


def test_services_expose_the_promised_rpcs() -> None:
    rpcs = {
        svc.name: {m.name for m in svc.methods}
        for module in (scheduler_pb2, agent_pb2, admin_pb2)
        for svc in module.DESCRIPTOR.services_by_name.values()
    }
    assert {"SubmitTask", "GetTask", "ListTasks", "WatchTask", "CancelTask", "Explain", "Heartbeat"} <= rpcs[
        "Scheduler"
    ]
    assert {"RunTask", "CancelTask", "Describe"} <= rpcs["Agent"]
    assert {"SetBudget", "LockProject", "UnlockProject", "ReloadRules", "DrainAgent"} <= rpcs["Admin"]
    assert scheduler_pb2.DESCRIPTOR.package == "facefleet.v1"


def test_enums_are_the_documented_values() -> None:
    assert [v.name for v in types_pb2.Sensitivity.DESCRIPTOR.values][1:] == [
        "SENSITIVITY_PUBLIC",
        "SENSITIVITY_INTERNAL",
        "SENSITIVITY_PRIVATE",
    ]
    assert [v.name for v in types_pb2.Priority.DESCRIPTOR.values][1:] == [
        "PRIORITY_LOW",
        "PRIORITY_NORMAL",
        "PRIORITY_HIGH",
        "PRIORITY_URGENT",
    ]
    assert types_pb2.PlacementDecision.Outcome.Name(3) == "REJECT"
