"""A GroupIM model as an MLflow pyfunc: groups of member user ids in, top-K items out.

Input: one list of member user ids per group (the dataset's ids, 0 to n_users - 1), as a
list of lists or as a pandas DataFrame whose single column `users` contains the lists.
Output: one dict per group with `items` (the top-K item ids, best first) and `scores`
(the model's group logits of those items, higher is better). The parameter `k` sets K.

The model's artifacts carry all it needs: a groupim checkpoint and the member_items matrix
(users x items, the training and fold-in histories from which members are encoded).
This module imports only groupim, MLflow and their dependencies, because the logged
model carries it as code (see search/registry.py).
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import scipy.sparse as sp

from groupim.checkpoint import load_checkpoint
from groupim.evaluate import EVAL_BATCH_SIZE
from groupim.recommend import check_groups, recommend

USERS_COLUMN = "users"  # the DataFrame input's column
DEFAULT_K = 10

# Names of the model's artifacts.
CHECKPOINT_ARTIFACT = "checkpoint"  # a groupim.checkpoint file
MEMBER_ITEMS_ARTIFACT = "member_items"  # scipy .npz of the users x items CSR matrix


class GroupRecommender(mlflow.pyfunc.PythonModel):
    """Recommends items to groups from a GroupIM checkpoint and the users' item histories.

    MLflow 3 derives the model's input schema from the type hint of `predict`, and turns
    a DataFrame with one column of lists into the list of lists.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model, self.config, _ = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self.member_items = sp.load_npz(context.artifacts[MEMBER_ITEMS_ARTIFACT]).tocsr()  # [U, I]
        if self.member_items.shape[1] != self.model.n_items:
            raise ValueError(
                f"member_items has {self.member_items.shape[1]} items but the checkpoint's model "
                f"{self.model.n_items}; log the model again with the dataset it was trained on"
            )

    def predict(
        self, context: Any, model_input: list[list[int]], params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Top-k items and scores per group; raises groupim.recommend.UnknownUserError naming unknown ids."""
        k = int((params or {}).get("k", DEFAULT_K))
        groups = [list(members) for members in model_input]
        # Checked here as a whole, so that an error names the group's position in the input.
        check_groups(groups, self.member_items.shape[0])
        output = []
        # Batches of EVAL_BATCH_SIZE groups bound the memory of the [B, I] score matrix.
        for start in range(0, len(groups), EVAL_BATCH_SIZE):
            batch = groups[start : start + EVAL_BATCH_SIZE]
            for result in recommend(self.model, self.member_items, batch, k, self.config.member_norm):
                output.append({"items": result.items, "scores": result.scores})
        return output
