"""Names of the declared extras that travel between the server and the sites.

Extras are tensors a method declares, beside the parameters: the server's broadcast
(`RoundInfo.extras`) and a site's `Update.extras`. A client method and the server step that reads
what it sends agree on these names; neither imports the other (they sit on the same layer).
"""

SCAFFOLD_SERVER_CONTROL = "scaffold.c/"  # + parameter name: the server's control variate c (broadcast)
SCAFFOLD_CONTROL_DELTA = "scaffold.dc/"  # + parameter name: a site's change of its control variate c_i
LABEL_DISTRIBUTION = "label_distribution"  # the federation's share of each class (broadcast, FedSLD)
CLIP_NORM = "dp.clip_norm"  # the round's clipping bound under adaptive clipping (broadcast)
WITHIN_BOUND = "dp.within_bound"  # 1.0 if a site's update was within the bound before clipping, else 0.0
