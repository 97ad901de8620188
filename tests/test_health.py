"""Training health checks: finite but hopeless training is reported, healthy is not."""

from pyro_lvm.experiments.health import check_epoch


def _kinds(record, first_loss=100.0, first_step=None):
    return [issue.kind for issue in check_epoch(record, first_loss, first_step)]


def test_a_healthy_langevin_epoch_has_no_issue():
    record = {"epoch": 3, "train_loss": 80.0, "step_size": 1e-3, "accept_rate": 0.57}
    assert _kinds({**record, "move_ratio": 0.05}, first_step=2e-3) == []


def test_a_step_size_fallen_by_orders_of_magnitude_has_collapsed():
    # the DMM's LAE run: 1.1e-2 at the start, 1e-6 within 500 steps
    issues = check_epoch({"epoch": 2, "step_size": 1e-6}, 100.0, 1.1e-2)
    assert [i.kind for i in issues] == ["step_size_collapsed"]
    assert "from 0.011 at the first step" in issues[0].message and "\n" not in issues[0].message
    assert _kinds({"epoch": 2, "step_size": 1e-4}, first_step=1.1e-2) == []  # 110x: adapting
    assert _kinds({"epoch": 2, "step_size": 1e-9}) == ["step_size_collapsed"]  # the floor


def test_a_fallen_step_size_with_latents_still_moving_is_no_collapse():
    # the DMM's LAE run with the trunk's Jacobian correction: the features grow, the
    # weight step falls 1.1e-2 -> 1.8e-6, the latents move 0.06 -> 0.12 per transition
    record = {"epoch": 9, "step_size": 1.8e-6, "move": 0.12}
    assert check_epoch(record, 100.0, 1.1e-2, 0.06) == []
    collapsed = {"epoch": 9, "step_size": 1.8e-6, "move": 0.0007}  # and without it
    assert [i.kind for i in check_epoch(collapsed, 100.0, 1.1e-2, 0.06)] == ["step_size_collapsed"]


def test_latents_that_do_not_move_are_a_frozen_chain():
    assert _kinds({"epoch": 1, "move_ratio": 2e-4}) == ["chain_frozen"]
    assert _kinds({"epoch": 1, "move_ratio": float("nan")}) == []


def test_loss_growth_and_no_acceptance():
    assert _kinds({"epoch": 1, "train_loss": 5000.0}) == ["loss_exploded"]
    assert _kinds({"epoch": 1, "accept_rate": 0.0}) == ["no_acceptance"]
