"""The one mapping from channel names to normalised measures."""

from __future__ import annotations

import pytest

from collector.measures import (
    MeasureChannels,
    Measures,
    device_measures,
    measure_channels,
)


@pytest.mark.parametrize("model", ["101", "102", "103", "111", "112", "113"])
def test_inverter_models_ac_power_and_energy(model: str) -> None:
    values = {f"{model}.W": 4200.0, f"{model}.WH": 1.5e6, f"{model}.DCW": 4400.0}

    assert device_measures(values) == Measures(4200.0, 1.5e6, (4400.0,), None, None)


def test_der_701_power_and_injected_energy() -> None:
    values = {"701.W": 9800.0, "701.TotWhInj": 2.0e7, "701.TotWhAbs": 10.0}

    assert device_measures(values) == Measures(9800.0, 2.0e7, (), None, None)


def test_inverter_model_preferred_over_701() -> None:
    channels = measure_channels(["701.W", "103.W", "701.TotWhInj", "103.WH"])

    assert channels.ac_power == "103.W"
    assert channels.lifetime_energy == "103.WH"


def test_mppt_modules_in_input_order() -> None:
    values = {
        "103.DCW": 900.0,
        "160.module[10].DCW": 3.0,
        "160.module[2].DCW": 2.0,
        "160.module[1].DCW": None,
    }

    assert device_measures(values).dc_power_w == (None, 2.0, 3.0)


@pytest.mark.parametrize("model", ["201", "202", "203", "204", "211", "212", "213",
                                   "214"])
def test_meter_models_grid_energy(model: str) -> None:
    values = {f"{model}.W": -300.0, f"{model}.TotWhImp": 10.0,
              f"{model}.TotWhExp": 20.0}

    assert device_measures(values) == Measures(None, None, (), 10.0, 20.0)
    assert not measure_channels(values).is_inverter


def test_second_model_instance_ignored() -> None:
    assert measure_channels(["103#2.W", "203#2.TotWhImp"]) == MeasureChannels()


def test_measure_channel_names() -> None:
    channels = measure_channels(["701.W", "160.module[1].DCW", "203.TotWhExp"])

    assert channels.names() == ["701.W", "203.TotWhExp", "160.module[1].DCW"]
    assert channels.is_inverter


def test_measures_json() -> None:
    assert Measures(1.0, 2.0, (3.0, None)).to_json() == {
        "ac_power_w": 1.0,
        "lifetime_energy_wh": 2.0,
        "dc_power_w": [3.0, None],
        "grid_import_wh": None,
        "grid_export_wh": None,
    }
