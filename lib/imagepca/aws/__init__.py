"""imagepca on AWS EMR, in the order a person deploys it.

- :mod:`.settings`  ``AwsSettings`` / ``EmrSettings``: load, override, validate
- :mod:`.account`   step 1, once: bucket, IAM roles and policies (``aws setup``)
- :mod:`.doctor`    before a cluster: what the caller's credentials can check
- :mod:`.stage`     step 2: data and artifacts to S3 (``aws upload``, ``emr stage``)
- :mod:`.cluster`   step 3: render, security configuration, ``up``, ``down``, cost
- :mod:`.runs`      step 4: the notebooks as an EMR step, a notebook execution, or via Livy
- :mod:`.commands`  argparse wiring of ``imagepca aws ...`` and ``imagepca emr ...``

Nothing here imports :mod:`imagepca.cli`; the CLI imports :mod:`.commands`.
"""
