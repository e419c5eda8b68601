"""A whole training step (forward, backward, step) under GrowingReg against plain SGD, same run:
the step benchmarks time the regularization alone and cannot see a cost that lands elsewhere
(a second OpenMP thread pool spinning against torch's once made this step 2.7x a plain one)."""
import pytest

from greg_fast import bench


@pytest.mark.parametrize("net", list(bench.TRAIN_STEPS))
def test_training_step(net, device, records):
    rows = bench.training_step_records(net, device)
    for r in rows:
        print(f"\n{net} {r['provider']}: {1e3 * r['seconds']:.1f} ms, {r['vs_train_sgd']:.3f}x plain SGD "
              f"(p10-p90 {r['vs_train_sgd_p10_p90'][0]:.3f}-{r['vs_train_sgd_p10_p90'][1]:.3f})")
    records.extend(rows)
