"""Bytes -> batches: the insightface RecordIO layout read and written without MXNet, and the loaders.

Library code: no process group, no ``.cuda()``; imports no other package of the project. Every rank
opens the same files with its own reader and reads only its block of each epoch (``epoch_plan``); the
big ``.idx`` is parsed once and memory-mapped by all ranks and workers (``index_cache``).

Where things live, from the disk up:

======================  ================================================================================
``record_format``       the RecordIO chunk format, ``IRHeader``, ``pack``/``unpack``, ``encode_record``
``record_chunks``       walking chunks in a ``.rec``: read one record, scan record starts, gather heads
``index_file``          the ``.idx`` text file <-> (n, 2) int64 [key, offset] arrays
``index_cache``         ``load_index``: the ``.idx`` parsed once, cached as ``.idx.npy``, memory-mapped
``written_keys``        the writer's duplicate-key check at 8 B per key
``recordio``            ``RecordReader`` / ``RecordWriter`` (and the format re-exported: the interface)
``key_ranges``          exact header/identity key ranges from float32 labels and uint64 id/id2
``property_file``       the dataset's file names and its ``property`` (``num_classes,height,width``)
``insightface``         ``InsightFaceReader`` (and the writer re-exported): the layout on top of RecordIO
``insightface_writer``  ``InsightFaceWriter``: a dataset written one identity at a time
``atomic``              the project's one atomic, durable file write (also used by ``launcher``)
``epoch_plan``          which image each rank reads, in which order, flipped or not (torch and DALI alike)
``dataset``             the torch path: ``FaceDataset``, ``build_dataloader``, uint8 batches in shared memory
``worker_batches``      what a torch worker hands over (``Batch``), the shared buffers it reuses, and the
                        training process's side of them (each buffer mapped once, leases)
``dali_pipeline``       the DALI graph and the per-rank epoch index it reads
``dali_iterator``       ``DaliLoader``: the DALI path with the torch path's interface
``pack``                ``pfc data pack``: image folder or ``.lst`` -> dataset
``checks``              ``pfc data inspect``: every record checked from its head; ``inspect_report`` prints it
``verification``        the ``.bin`` verification sets (read without trusting the pickle), pairs
``synth``               the learnable synthetic identities of ``pfc data synth`` and ``make demo``
``scale``               WebFace42M-sized synthetic files in minutes (tiny payloads) for the scale tests
``loader_bench``        ``pfc bench data``: loader images/s against ``decode_ceiling``
``scale_bench``         ``pfc bench data --scale N``: open/inspect/DALI figures at N images
``progress_bar``        the tqdm bar of the data tools
======================  ================================================================================
"""
