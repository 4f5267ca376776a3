"""The data pipeline: text -> tokenizer -> Megatron shards -> samples -> resumable batches.

Public API (import from the modules; importing this package imports nothing heavy):
    tokenizer.build_tokenizer(type, model) -> Tokenizer     preprocess.preprocess(...)   merge.merge_datasets(...)
    indexed.IndexedDataset(prefix), IndexedDatasetWriter     meta.check_shard_tokenizer(prefix, tokenizer)
    builder.build_datasets(cfg.data, tokenizer, seed, (n_train, n_valid, n_test)) -> (train, valid, test)
    sampler.MegatronPretrainingSampler(total, consumed, micro, data_rank, data_size), build_dataloader(...)
"""
