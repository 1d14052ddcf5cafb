//! A partial MST in memory: nodes are loaded from a CAR's blocks only when an insert or
//! remove has to look inside them, everything else stays a CID. Inverting a commit's ops on
//! the tree its CAR proves, then hashing the root, gives the tree before the commit (Sync 1.1
//! "inductive firehose"); a node the operation needs but the CAR lacks is
//! [`VerifyError::MissingBlock`].
//!
//! In memory a node is a list of entries, leaves and child links in key order, never two
//! links in a row (the wire form's `l` and `t` become links between leaves). A node's height
//! is known from its parent; the root's from its first key.

use cid::Cid;

use super::blocks::Blocks;
use super::error::VerifyError;
use super::mst::{cid_for, decode_node, key_height, write_node};

/// Highest root accepted: a key of height 32 needs 64 leading zero bits of sha256, so honest
/// repos never come near it; it bounds recursion on forged trees.
pub const MAX_HEIGHT: u8 = 32;

#[derive(Debug)]
enum Link {
    Stub(Cid),
    Loaded(Box<Node>),
}

#[derive(Debug)]
enum Entry {
    Leaf { key: Vec<u8>, value: Cid },
    Child(Link),
}

#[derive(Debug)]
struct Node {
    height: u8,
    entries: Vec<Entry>,
    /// The CID while the node is unchanged since it was loaded.
    cid: Option<Cid>,
}

impl Node {
    fn empty(height: u8) -> Self {
        Self {
            height,
            entries: Vec::new(),
            cid: None,
        }
    }

    /// Decodes block `cid` as a node of `height` (`None`: the root, height from its keys).
    fn load(blocks: &Blocks<'_>, cid: &Cid, height: Option<u8>) -> Result<Self, VerifyError> {
        let data = decode_node(blocks.get(cid)?)?;
        let height = match (height, data.entries.first()) {
            (Some(h), _) => h,
            (None, Some(first)) => key_height(&first.key),
            (None, None) if data.left.is_none() => 0,
            (None, None) => return Err(VerifyError::BadMst("root with only a subtree".into())),
        };
        if height > MAX_HEIGHT {
            return Err(VerifyError::TooDeep);
        }
        let mut entries = Vec::with_capacity(data.entries.len() * 2 + 1);
        let mut links = data.left.is_some();
        if let Some(l) = data.left {
            entries.push(Entry::Child(Link::Stub(l)));
        }
        for e in data.entries {
            if key_height(&e.key) != height {
                return Err(VerifyError::BadMst(format!("key at wrong height {height}")));
            }
            let right = e.right;
            entries.push(Entry::Leaf {
                key: e.key,
                value: e.value,
            });
            if let Some(t) = right {
                links = true;
                entries.push(Entry::Child(Link::Stub(t)));
            }
        }
        if links && height == 0 {
            return Err(VerifyError::BadMst("subtree below height 0".into()));
        }
        Ok(Self {
            height,
            entries,
            cid: Some(*cid),
        })
    }

    /// Index of the first leaf with key ≥ `key` (or the end).
    fn position(&self, key: &[u8]) -> usize {
        self.entries
            .iter()
            .position(|e| matches!(e, Entry::Leaf { key: k, .. } if k.as_slice() >= key))
            .unwrap_or(self.entries.len())
    }

    fn child_before(&self, pos: usize) -> bool {
        pos > 0 && matches!(self.entries[pos - 1], Entry::Child(_))
    }

    fn encode(&mut self) -> Result<Cid, VerifyError> {
        if let Some(cid) = self.cid {
            return Ok(cid);
        }
        let cid = cid_for(&self.bytes()?);
        self.cid = Some(cid);
        Ok(cid)
    }

    /// The node's block (children's CIDs computed as needed), encoded from the entries in
    /// place: no key is copied.
    fn bytes(&mut self) -> Result<Vec<u8>, VerifyError> {
        let mut children: Vec<Cid> = Vec::new();
        for entry in &mut self.entries {
            if let Entry::Child(link) = entry {
                children.push(link.cid()?);
            }
        }
        let mut children = children.into_iter();
        let mut left = None;
        let mut wire: Vec<(&[u8], &Cid, Option<Cid>)> = Vec::with_capacity(self.entries.len());
        let mut after_child = false;
        for entry in &self.entries {
            match entry {
                Entry::Leaf { key, value } => {
                    wire.push((key, value, None));
                    after_child = false;
                }
                Entry::Child(_) => {
                    let cid = children.next();
                    if after_child || cid.is_none() {
                        return Err(VerifyError::BadMst("two subtrees in a row".into()));
                    }
                    match wire.last_mut() {
                        Some(last) => last.2 = cid,
                        None => left = cid,
                    }
                    after_child = true;
                }
            }
        }
        let entries = wire.iter().map(|(k, v, r)| (*k, *v, r.as_ref()));
        write_node(left.as_ref(), wire.len(), entries)
    }
}

impl Link {
    fn node(&mut self, blocks: &Blocks<'_>, height: u8) -> Result<&mut Node, VerifyError> {
        if let Self::Stub(cid) = self {
            let node = Node::load(blocks, cid, Some(height))?;
            if node.entries.is_empty() {
                return Err(VerifyError::BadMst("empty subtree".into()));
            }
            *self = Self::Loaded(Box::new(node));
        }
        match self {
            Self::Loaded(node) => Ok(node),
            Self::Stub(_) => Err(VerifyError::BadMst("unloaded".into())),
        }
    }

    fn cid(&mut self) -> Result<Cid, VerifyError> {
        match self {
            Self::Stub(cid) => Ok(*cid),
            Self::Loaded(node) => node.encode(),
        }
    }

    fn into_node(self, blocks: &Blocks<'_>, height: u8) -> Result<Node, VerifyError> {
        let mut link = self;
        link.node(blocks, height)?;
        match link {
            Self::Loaded(node) => Ok(*node),
            Self::Stub(_) => Err(VerifyError::BadMst("unloaded".into())),
        }
    }
}

/// An MST loaded lazily from `blocks`.
pub struct PartialTree<'b, 'a> {
    root: Node,
    /// Set when removals left the root as a subtree not loaded yet: (CID, height).
    stub: Option<(Cid, u8)>,
    blocks: &'b Blocks<'a>,
}

impl<'b, 'a> PartialTree<'b, 'a> {
    /// The tree whose root is block `root`.
    pub fn load(blocks: &'b Blocks<'a>, root: &Cid) -> Result<Self, VerifyError> {
        Ok(Self {
            root: Node::load(blocks, root, None)?,
            stub: None,
            blocks,
        })
    }

    /// An empty tree (the root of a repo without records).
    pub fn empty(blocks: &'b Blocks<'a>) -> Self {
        Self {
            root: Node::empty(0),
            stub: None,
            blocks,
        }
    }

    /// The root's CID as the tree stands now.
    pub fn root_cid(&mut self) -> Result<Cid, VerifyError> {
        match self.stub {
            Some((cid, _)) => Ok(cid),
            None => self.root.encode(),
        }
    }

    /// The root's CID when removals left it as a subtree the CAR does not hold (so whether
    /// it was trimmed far enough is unknown).
    pub fn unresolved_root(&self) -> Option<Cid> {
        self.stub.map(|(cid, _)| cid)
    }

    fn root(&mut self) -> Result<&mut Node, VerifyError> {
        if let Some((cid, height)) = self.stub.take() {
            self.root = Node::load(self.blocks, &cid, Some(height))?;
        }
        Ok(&mut self.root)
    }

    /// Sets `key` to `value`; returns the value it replaced.
    pub fn insert(&mut self, key: &[u8], value: Cid) -> Result<Option<Cid>, VerifyError> {
        let height = key_height(key);
        if height > MAX_HEIGHT {
            return Err(VerifyError::TooDeep);
        }
        let blocks = self.blocks;
        let root = self.root()?;
        while height > root.height {
            if root.entries.is_empty() {
                root.height = height;
                root.cid = None;
                break;
            }
            let old = std::mem::replace(root, Node::empty(root.height + 1));
            root.entries.push(Entry::Child(Link::Loaded(Box::new(old))));
        }
        insert(root, key, height, value, blocks)
    }

    /// Removes `key`; returns its value, `None` when it was not in the tree.
    pub fn remove(&mut self, key: &[u8]) -> Result<Option<Cid>, VerifyError> {
        let height = key_height(key);
        let blocks = self.blocks;
        let root = self.root()?;
        if height > root.height {
            return Ok(None);
        }
        let prev = remove(root, key, height, blocks)?;
        // A root left holding one subtree and no key is replaced by that subtree, as often as
        // it takes. A subtree the CAR lacks stays a CID (its height is one less): if it too
        // were only a subtree the root would be wrong, and the prevData check says so.
        while let [Entry::Child(_)] = self.root.entries.as_slice() {
            let height = self.root.height - 1;
            let Some(Entry::Child(link)) = self.root.entries.pop() else {
                break;
            };
            match link {
                Link::Loaded(node) => self.root = *node,
                Link::Stub(cid) if self.blocks.contains(&cid) => {
                    self.root = Node::load(self.blocks, &cid, Some(height))?;
                }
                Link::Stub(cid) => {
                    self.stub = Some((cid, height));
                    self.root = Node::empty(0);
                    break;
                }
            }
        }
        if self.root.entries.is_empty() {
            self.root.height = 0;
        }
        Ok(prev)
    }
}

fn insert(
    node: &mut Node,
    key: &[u8],
    height: u8,
    value: Cid,
    blocks: &Blocks<'_>,
) -> Result<Option<Cid>, VerifyError> {
    node.cid = None;
    let pos = node.position(key);
    if height == node.height {
        if let Some(Entry::Leaf { key: k, value: v }) = node.entries.get_mut(pos) {
            if k.as_slice() == key {
                return Ok(Some(std::mem::replace(v, value)));
            }
        }
        let leaf = Entry::Leaf {
            key: key.to_vec(),
            value,
        };
        if node.child_before(pos) {
            let Entry::Child(link) = node.entries.remove(pos - 1) else {
                return Err(VerifyError::BadMst("split".into()));
            };
            let (left, right) = split(link, node.height - 1, key, blocks)?;
            let mut mid: Vec<Entry> = Vec::with_capacity(3);
            mid.extend(left.map(Entry::Child));
            mid.push(leaf);
            mid.extend(right.map(Entry::Child));
            node.entries.splice(pos - 1..pos - 1, mid);
        } else {
            node.entries.insert(pos, leaf);
        }
        return Ok(None);
    }
    if node.child_before(pos) {
        let Entry::Child(link) = &mut node.entries[pos - 1] else {
            return Err(VerifyError::BadMst("descend".into()));
        };
        let child = link.node(blocks, node.height - 1)?;
        return insert(child, key, height, value, blocks);
    }
    let mut child = Node::empty(node.height - 1);
    insert(&mut child, key, height, value, blocks)?;
    node.entries
        .insert(pos, Entry::Child(Link::Loaded(Box::new(child))));
    Ok(None)
}

/// Splits subtree `link` (of `height`) around `key`: keys below, keys above.
fn split(
    link: Link,
    height: u8,
    key: &[u8],
    blocks: &Blocks<'_>,
) -> Result<(Option<Link>, Option<Link>), VerifyError> {
    let mut node = link.into_node(blocks, height)?;
    let pos = node.position(key);
    if let Some(Entry::Leaf { key: k, .. }) = node.entries.get(pos) {
        if k.as_slice() == key {
            return Err(VerifyError::BadMst("key below its height".into()));
        }
    }
    let mut right = node.entries.split_off(pos);
    let mut left = node.entries;
    if let Some(Entry::Child(_)) = left.last() {
        if let Some(Entry::Child(inner)) = left.pop() {
            let (a, b) = split(inner, height - 1, key, blocks)?;
            left.extend(a.map(Entry::Child));
            if let Some(b) = b {
                right.insert(0, Entry::Child(b));
            }
        }
    }
    let wrap = |entries: Vec<Entry>| {
        (!entries.is_empty()).then(|| {
            Link::Loaded(Box::new(Node {
                height,
                entries,
                cid: None,
            }))
        })
    };
    Ok((wrap(left), wrap(right)))
}

fn remove(
    node: &mut Node,
    key: &[u8],
    height: u8,
    blocks: &Blocks<'_>,
) -> Result<Option<Cid>, VerifyError> {
    let pos = node.position(key);
    if height == node.height {
        let found = matches!(node.entries.get(pos), Some(Entry::Leaf { key: k, .. }) if k.as_slice() == key);
        if !found {
            return Ok(None);
        }
        node.cid = None;
        let Entry::Leaf { value, .. } = node.entries.remove(pos) else {
            return Err(VerifyError::BadMst("remove".into()));
        };
        let joins =
            node.child_before(pos) && matches!(node.entries.get(pos), Some(Entry::Child(_)));
        if joins {
            let (Entry::Child(right), Entry::Child(left)) =
                (node.entries.remove(pos), node.entries.remove(pos - 1))
            else {
                return Err(VerifyError::BadMst("merge".into()));
            };
            let merged = merge(left, right, node.height - 1, blocks)?;
            node.entries.insert(pos - 1, Entry::Child(merged));
        }
        return Ok(Some(value));
    }
    if !node.child_before(pos) {
        return Ok(None);
    }
    let child_height = node.height - 1;
    let Entry::Child(link) = &mut node.entries[pos - 1] else {
        return Err(VerifyError::BadMst("descend".into()));
    };
    let child = link.node(blocks, child_height)?;
    let prev = remove(child, key, height, blocks)?;
    if prev.is_some() {
        node.cid = None;
        if child.entries.is_empty() {
            node.entries.remove(pos - 1);
        }
    }
    Ok(prev)
}

/// Joins two adjacent subtrees of `height` into one.
fn merge(left: Link, right: Link, height: u8, blocks: &Blocks<'_>) -> Result<Link, VerifyError> {
    let mut left = left.into_node(blocks, height)?;
    let right = right.into_node(blocks, height)?;
    left.cid = None;
    let mut rest = right.entries.into_iter();
    let joins = matches!(left.entries.last(), Some(Entry::Child(_)));
    if let Some(first) = rest.next() {
        match (joins, first) {
            (true, Entry::Child(r)) => {
                let Some(Entry::Child(l)) = left.entries.pop() else {
                    return Err(VerifyError::BadMst("merge".into()));
                };
                left.entries
                    .push(Entry::Child(merge(l, r, height - 1, blocks)?));
            }
            (_, first) => left.entries.push(first),
        }
    }
    left.entries.extend(rest);
    Ok(Link::Loaded(Box::new(left)))
}

#[cfg(test)]
#[path = "tree_tests.rs"]
mod tests;
