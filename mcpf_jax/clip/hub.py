"""Hugging Face Hub access, in one place: a repo's snapshot folder in the local cache, downloaded when allowed.

Every hub read of this project goes through `snapshot` (the CLIP backbones, their tokenizer files, exported IQA
models; the exporter's upload alone uses HfApi), so all of them honour HF_HUB_OFFLINE and fail with the same message
naming the repo and the cache.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence


def snapshot(repo_id: str, *, revision: str | None = None, cache_dir: str | None = None,
             allow_patterns: Sequence[str] | None = None, local_files_only: bool = False) -> pathlib.Path:
  """The snapshot folder of hub repo `repo_id` (only `allow_patterns` files, if given), from the Hugging Face
  cache or downloaded into it. HF_HUB_OFFLINE=1 (or `local_files_only`) reads the cache only.

  Raises:
    FileNotFoundError: not in the cache and it cannot be downloaded (offline, no such repo or revision, no
      network), naming the repo, the revision, why and the cache folder.
  """
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants, errors  # pylint: disable=g-import-not-at-top
  offline = local_files_only or constants.is_offline_mode()
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(
        repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(allow_patterns or []) or None,
        local_files_only=local_files_only))
  except (errors.LocalEntryNotFoundError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
          errors.GatedRepoError, errors.HfHubHTTPError, errors.OfflineModeIsEnabled, errors.HFValidationError,
          OSError) as e:
    cache = cache_dir or constants.HF_HUB_CACHE
    why = ("HF_HUB_OFFLINE is set (or only the cache was asked) and it is not in the Hugging Face cache"
           if offline else "it is not in the cache and could not be downloaded")
    raise FileNotFoundError(f"hub model {repo_id!r} (revision {revision or 'main'}): {why} (cache: {cache}). "
                            f"Download it where there is network (`hf download {repo_id}`) or pass a local "
                            f"folder. ({type(e).__name__}: {e})") from e
