"""The engine's extra memory on ResNet-50 next to the reference's full-size λ (a report, no timing)."""
import datetime

from greg_fast import bench, timing


def test_schedule_state_memory(records, device):
    rows = bench.memory_records("resnet50")
    print("\n" + bench.memory_table(rows))
    records.extend({**r, "device": timing.device_name(device), "date": datetime.date.today().isoformat()}
                   for r in rows)
