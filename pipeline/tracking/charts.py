"""The experiment's chart view as a person should first see it: the sample grids beside the metrics, by step.

MLflow's UI sections the chart view by metric prefix (`train/`, `val/`, `data/`; `system/` is MLflow's own) and
gives each image key a card. Left to its defaults, the card of the sample grids shows every run's parameters (the
whole flattened config, which fills the card) and step 0, where nothing was logged: no picture. So each finished
run saves a shared view of the experiment (MLflow's "share view", the experiment tag
`mlflow.sharedViewState.<key>`): the grid card without run parameters, at the run's last validation, with a slider
over the steps; every metric card is added by the UI as usual. `chart_view_route` is its address in the UI, named
in the run's description, and the experiment is marked a model-training experiment so that it opens on its runs.
"""

from __future__ import annotations

import json

SAMPLES_KEY = "val/samples"  # the MLflow image key of the sample grids (one a validation, by step)
VIEW_KEY = "recolor-charts"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
SECTIONS = ("val", "train", "data")
KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def chart_view(step: int) -> dict:
    """The view's state in the form MLflow's UI shares it: the grid card at `step`, and the metric sections."""
    card = {"type": "IMAGE", "uuid": "recolor-samples", "metricSectionId": "autogen-val", "isGenerated": True,
            "deleted": False, "imageKeys": [SAMPLES_KEY], "step": step, "showRunParams": False}  # fmt: skip
    sections = [{"display": True, "name": name, "uuid": f"autogen-{name}", "isReordered": False} for name in SECTIONS]
    return {"compareRunCharts": [card], "compareRunSections": sections, "isAccordionReordered": False}


def chart_view_route(experiment_id: str) -> str:
    """The view's address below the UI's root (`http://HOST:5000/` + this)."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&compareRunsMode=CHART"


def save_chart_view(client, experiment_id: str, step: int) -> str:
    """Save the view at `step` (the latest run's last validation) and mark the experiment a model-training one
    (unless it says otherwise); returns `chart_view_route`."""
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(chart_view(step)))
    if KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, KIND_TAG, MODEL_TRAINING)
    return chart_view_route(experiment_id)
