"""A local mteb STS task (no hub download) for the tests that run mteb. It imports no textjepa, so the
subprocess in test_conversion, where textjepa cannot be imported, uses it too."""


def local_sts_task(sentences1, sentences2, scores):
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalSTS(AbsTaskSTS):
        metadata = TaskMetadata(
            name="TextjepaLocalSTS", type="STS", main_score="cosine_spearman", description="generated pairs",
            reference="https://example.org", dataset={"path": "local", "revision": "local"}, category="t2t",
            eval_splits=["test"], eval_langs=["eng-Latn"], date=("2024-01-01", "2024-01-01"), dialect=[],
            domains=[], task_subtypes=[], license="cc-by-4.0", annotations_creators="derived", modalities=["text"],
            sample_creation="found", bibtex_citation="")
        min_score, max_score = 0, 5

        def load_data(self, num_proc=None, **kwargs):  # instead of a hub download
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"sentence1": list(sentences1), "sentence2": list(sentences2), "score": [float(s) for s in scores]})})
            self.data_loaded = True

    return LocalSTS()
