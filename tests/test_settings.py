"""PruneSettings hands each method its own options, built from the settings' fields."""

from __future__ import annotations

from rcpu_lite.methods import auto
from rcpu_lite.methods.compensation import CompensationOptions
from rcpu_lite.methods.reconstruct import ReconstructOptions
from rcpu_lite.settings import AUTO_METHODS, PruneSettings


def test_compensation_options_carry_the_settings():
    s = PruneSettings(decomposition="svd", damp=0.05, damp_abs=1e-4)
    assert s.compensation_options("cuda:1") == CompensationOptions(
        decomposition="svd", damp=0.05, damp_abs=1e-4, decomposition_device="cuda:1"
    )


def test_reconstruct_options_carry_the_settings():
    s = PruneSettings(
        recon_epochs=2, recon_lr=1e-3, recon_micro_batch=4, recon_train="out", recon_norms="train", seed=7
    )
    assert s.reconstruct_options() == ReconstructOptions(
        epochs=2, lr=1e-3, micro_batch=4, train="out", train_norms=True, seed=7
    )
    assert PruneSettings(recon_norms="frozen").reconstruct_options().train_norms is False


def test_the_default_settings_give_the_methods_default_options():
    assert PruneSettings().compensation_options("cpu") == CompensationOptions()
    assert PruneSettings().reconstruct_options() == ReconstructOptions()


def test_the_choosing_compensations_are_named_once():
    assert AUTO_METHODS is auto.METHODS
