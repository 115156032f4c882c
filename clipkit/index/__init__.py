"""Search indexes over a collection: embed it, build the right FAISS index, query and serve it.

    embed.py    collection -> sharded .npy embeddings + parquet metadata (layout: store.py)
    sources.py  what embed reads: webdataset shards, an image folder, a manifest
    choose.py   pure: candidate index keys and their memory for n, d and a budget
    build.py    train on a sample, add part by part, tune nprobe / efSearch, report
    partition.py   add per partition on a process pool (partition_ray.py: on Ray), then join
    ondisk.py   inverted lists in an .ivfdata file: join, open relocatably, atomic commit
    search.py   load (memory-mapped), check, query by vector / key
    query.py    the query model, command-line queries (text, image, batch file) -> rows
    merge.py    join index folders built on separate parts
    server.py   HTTP JSON API + search page (page.py)
    families/   index families (flat, hnsw, ivf, ivf_refine): one registry, one module each

The CLI is ``clipkit index {embed,build,merge,query,serve}`` (clipkit/cli/index_cmd.py).
"""
