"""The gradient cache (GC-DPR): a contrastive loss over a large batch in small chunks.

A contrastive loss couples every example of the batch (each question is
scored against every block), so its gradient seems to need the whole batch's
activations at once. It does not: the loss depends on the encoders' weights
only through the representations. So, per tower (the query encoder, the
block encoder):

1. the representations of the batch, chunk by chunk, without a tape (no
   activations kept);
2. the loss of all the representations and its gradient with respect to
   them, d loss / d reps (small: [B, D]);
3. per chunk, the chunk re-encoded under a tape and back-propagated with
   `tape.gradient(reps, variables, output_gradients=d loss / d reps[chunk])`,
   the chunks' gradients summed.

The sum is d loss / d weights exactly (the chain rule, split at the
representations), and the activations held at any time are one chunk's.
Step 3 must recompute what step 1 computed: dropout is replayed from the
examples' seeds (`realm_embedder.example_dropout`), not drawn afresh.

Under a tf.distribute strategy (call these in the replica context, i.e.
inside `strategy.run`), each replica holds its slice of the global batch.
The representations are all-gathered (`ReplicaContext.all_gather`, in
replica order) before the loss, so each replica computes the same loss over
the GLOBAL batch, with every other replica's examples as negatives; its
d loss / d reps is sliced back to its own rows, and its gradients are those
of the global loss through its own examples. Gradient scaling: none. The
loss is the mean over the global batch, computed identically on every
replica, and the replicas' gradients are contributions of disjoint examples,
so their SUM (what `optimizer.apply_gradients` all-reduces in a replica
context) is the full-batch gradient. `full_batch_gradients` gives the same
update without the cache (one forward over the replica's batch under a
tape), for comparison and for small batches.

A tower is (encode, variables, chunk_size): `encode(features, seeds)` maps
[n, ...] features and int [n] example seeds to [n, D] representations; a
tower with no variables is frozen (encoded once, without a tape, never
re-encoded).
"""

import dataclasses
import typing

import tensorflow as tf

import utils


@dataclasses.dataclass(frozen=True)
class Tower:
  """One encoder of a contrastive loss, and how many examples it encodes at once."""
  encode: typing.Callable
  variables: tuple
  chunk_size: int


def check_chunk_size(chunk_size, batch_size, flag):
  """A UserError unless 1 <= chunk_size <= batch_size (what one replica encodes)."""
  if not 1 <= chunk_size <= batch_size:
    raise utils.UserError(
        f"--{flag}={chunk_size}: expected between 1 and the {batch_size} "
        "examples a replica encodes per step")


def _chunks(features, seeds, chunk_size):
  """(features, seeds) of consecutive chunks of `chunk_size` rows (static shapes)."""
  count = int(seeds.shape[0])
  for start in range(0, count, chunk_size):
    stop = min(start + chunk_size, count)
    yield ({name: value[start:stop] for name, value in features.items()},
           seeds[start:stop])


def _encode_in_chunks(tower, features, seeds):
  """The representations, one chunk after another (see `_after`)."""
  reps = []
  for chunk, chunk_seeds in _chunks(features, seeds, tower.chunk_size):
    with _after(reps[-1:]):
      reps.append(tf.stop_gradient(tower.encode(chunk, chunk_seeds)))
  return tf.concat(reps, axis=0)


def _after(tensors):
  """A context whose ops wait for `tensors`.

  In a tf.function the chunks do not depend on each other, so TensorFlow's
  executor may run their forward passes at once and hold every chunk's
  activations together, the memory the cache is there to save. Each chunk's
  ops wait for the previous chunk's result instead (in eager mode ops run in
  order anyway).
  """
  return tf.control_dependencies(tensors)


def _replica():
  """(replica context, replica id, number of replicas) of the caller."""
  context = tf.distribute.get_replica_context()
  return context, context.replica_id_in_sync_group, context.num_replicas_in_sync


def _gather(reps):
  """The global batch's representations, replicas in order."""
  context, _, num_replicas = _replica()
  if num_replicas == 1:
    return reps
  return context.all_gather(reps, axis=0)


def _own_rows(global_values, local_count):
  """This replica's rows of an all-gathered [R * n, ...] tensor."""
  _, replica_id, _ = _replica()
  start = replica_id * local_count
  return global_values[start:start + local_count]


def contrastive_loss(query_reps, block_reps):
  """Mean cross-entropy of each question's positive block among all the blocks.

  The in-batch contrastive loss (DPR's, c-REALM's) over the GLOBAL batch:
  replica r's questions are rows r * n ... of `query_reps` and its blocks
  rows r * m ... of `block_reps`, each replica's blocks being its n
  positives (question i's first) then its hard negatives. Every block of the
  batch is a negative of every question it is not the positive of.
  """
  _, _, num_replicas = _replica()
  num_queries = tf.shape(query_reps)[0]
  queries_per_replica = num_queries // num_replicas
  blocks_per_replica = tf.shape(block_reps)[0] // num_replicas
  question = tf.range(num_queries)
  labels = ((question // queries_per_replica) * blocks_per_replica +
            question % queries_per_replica)
  scores = tf.matmul(query_reps, block_reps, transpose_b=True)
  return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels, scores))


def cached_gradients(towers, inputs, loss_fn):
  """(loss, gradients) of `loss_fn` by the gradient cache.

  Args:
    towers: a list of `Tower`.
    inputs: per tower, (features {name: [n, ...]}, seeds int [n]); this
      replica's examples, the same n on every replica.
    loss_fn: (global reps of tower 0, of tower 1, ...) -> scalar loss.

  Returns:
    The loss and, per tower, the gradients of its variables (this replica's
    share: sum them over replicas).
  """
  local_reps = [_encode_in_chunks(tower, features, seeds)
                for tower, (features, seeds) in zip(towers, inputs)]
  global_reps = [_gather(reps) for reps in local_reps]
  with tf.GradientTape() as tape:
    tape.watch(global_reps)
    loss = loss_fn(*global_reps)
  rep_gradients = tape.gradient(loss, global_reps)
  gradients = []
  for tower, (features, seeds), reps, rep_gradient in zip(
      towers, inputs, local_reps, rep_gradients):
    if not tower.variables:
      gradients.append([])
      continue
    own = _own_rows(rep_gradient, int(reps.shape[0]))
    total = [tf.zeros_like(variable) for variable in tower.variables]
    start = 0
    for chunk, chunk_seeds in _chunks(features, seeds, tower.chunk_size):
      count = int(chunk_seeds.shape[0])
      # The first re-forward after the loss, each next one after the last
      # chunk's backward pass: one chunk's activations live at a time.
      with _after(total if start else [own]), tf.GradientTape() as tape:
        chunk_reps = tower.encode(chunk, chunk_seeds)
      chunk_gradients = tape.gradient(
          chunk_reps, tower.variables,
          output_gradients=own[start:start + count],
          unconnected_gradients=tf.UnconnectedGradients.ZERO)
      total = [t + tf.convert_to_tensor(g)
               for t, g in zip(total, chunk_gradients)]
      start += count
    gradients.append(total)
  return loss, gradients


def _with_own_rows_live(reps):
  """The global batch's representations in which only this replica's rows
  carry a gradient (the others are another replica's to differentiate)."""
  _, replica_id, num_replicas = _replica()
  if num_replicas == 1:
    return reps
  gathered = _gather(tf.stop_gradient(reps))
  count = int(reps.shape[0])
  start = replica_id * count
  return tf.concat([gathered[:start], reps, gathered[start + count:]], axis=0)


def full_batch_gradients(towers, inputs, loss_fn):
  """(loss, gradients) as `cached_gradients` gives them, without the cache:
  each tower encodes the replica's whole batch in one call under one tape."""
  with tf.GradientTape() as tape:
    global_reps = []
    for tower, (features, seeds) in zip(towers, inputs):
      reps = tower.encode(features, seeds)
      if not tower.variables:
        reps = tf.stop_gradient(reps)
      global_reps.append(_with_own_rows_live(reps))
    loss = loss_fn(*global_reps)
  variables = [v for tower in towers for v in tower.variables]
  flat = iter(tape.gradient(loss, variables,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO))
  return loss, [[tf.convert_to_tensor(next(flat)) for _ in tower.variables]
                for tower in towers]
