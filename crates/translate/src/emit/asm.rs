//! The assembler blocks are built with: dynasm-rs's macros on a byte
//! vector of our own, which the engine keeps between blocks and copies
//! straight into the code buffer.
//!
//! dynasmrt's `VecAssembler` keeps local labels in a hash map keyed by
//! name (a string hash for every `>label` and `label:`) and hands its bytes
//! out only by value or through a draining iterator (a copy byte by byte
//! into yet another vector, or a new vector per block). A block uses a
//! handful of local labels, each referred to from a few bytes before or
//! after its definition, so here a forward reference waits in a short list
//! until the label's next definition patches it, and a backward reference
//! is patched at once from the latest definition. Global and dynamic
//! labels are not used by the translator (a branch to a stub assembled
//! later is patched by hand, see `jcc_forward`) and are an error.

use dynasmrt::components::PatchLoc;
use dynasmrt::x64::X64Relocation;
use dynasmrt::{
    AssemblyOffset, DynamicLabel, DynasmApi, DynasmError, DynasmLabelApi, LabelKind, TargetKind,
};

use crate::emit::BuildError;

/// A reusable assembler over one byte vector (base address 0: code that
/// refers outside itself computes the distance from the block's offset,
/// see `jmp_to`).
pub(crate) struct Asm {
    ops: Vec<u8>,
    /// The latest definition of each local label name.
    locals: Vec<(&'static str, usize)>,
    /// References waiting for the next definition of a local label.
    forward: Vec<(&'static str, PatchLoc<X64Relocation>)>,
    /// The first error (a relocation out of reach, an unknown label).
    error: Option<DynasmError>,
}

impl Asm {
    /// An empty assembler with room for a large block.
    pub(crate) fn new() -> Asm {
        Asm {
            ops: Vec::with_capacity(4096),
            locals: Vec::with_capacity(8),
            forward: Vec::with_capacity(8),
            error: None,
        }
    }

    /// The bytes assembled so far, to append host code to directly.
    #[inline]
    pub(crate) fn bytes_mut(&mut self) -> &mut Vec<u8> {
        &mut self.ops
    }

    /// Empty it for the next block (keeping its room).
    pub(crate) fn clear(&mut self) {
        self.ops.clear();
        self.locals.clear();
        self.forward.clear();
        self.error = None;
    }

    /// The assembled bytes, if every label was found.
    pub(crate) fn finish(&mut self) -> Result<&[u8], BuildError> {
        if let Some(e) = self.error.take() {
            return Err(BuildError(format!("assembling a block: {e}")));
        }
        if let Some((name, _)) = self.forward.first() {
            return Err(BuildError(format!(
                "assembling a block: local label {name} referred to but not defined"
            )));
        }
        Ok(&self.ops)
    }

    pub(crate) fn fail(&mut self, e: DynasmError) {
        self.error.get_or_insert(e);
    }

    fn here(
        &self,
        target_offset: isize,
        field_offset: u8,
        ref_offset: u8,
        kind: X64Relocation,
    ) -> PatchLoc<X64Relocation> {
        PatchLoc::new(
            AssemblyOffset(self.ops.len()),
            target_offset,
            field_offset,
            ref_offset,
            kind,
        )
    }
}

/// Are two label names the same? (The same literal, most often: the
/// bytes are compared only if the pointers differ.)
#[inline]
fn same(a: &str, b: &str) -> bool {
    std::ptr::eq(a, b) || a == b
}

/// Write `target` into the field `loc` describes.
fn patch(ops: &mut [u8], loc: &PatchLoc<X64Relocation>, target: usize) -> Result<(), BuildError> {
    loc.patch(&mut ops[loc.range(0)], 0, target)
        .map_err(|_| BuildError("assembling a block: a label out of reach".into()))
}

impl Extend<u8> for Asm {
    fn extend<T: IntoIterator<Item = u8>>(&mut self, iter: T) {
        self.ops.extend(iter)
    }
}

impl<'a> Extend<&'a u8> for Asm {
    fn extend<T: IntoIterator<Item = &'a u8>>(&mut self, iter: T) {
        self.ops.extend(iter)
    }
}

impl DynasmApi for Asm {
    fn offset(&self) -> AssemblyOffset {
        AssemblyOffset(self.ops.len())
    }
    fn push(&mut self, byte: u8) {
        self.ops.push(byte);
    }
    fn align(&mut self, alignment: usize, with: u8) {
        while self.ops.len() % alignment != 0 {
            self.ops.push(with);
        }
    }
}

impl DynasmLabelApi for Asm {
    type Relocation = X64Relocation;

    fn local_label(&mut self, name: &'static str) {
        let at = self.ops.len();
        let mut i = 0;
        while i < self.forward.len() {
            if same(self.forward[i].0, name) {
                let (_, loc) = self.forward.swap_remove(i);
                if patch(&mut self.ops, &loc, at).is_err() {
                    self.fail(DynasmError::ImpossibleRelocation(TargetKind::Local(name)));
                }
            } else {
                i += 1;
            }
        }
        match self.locals.iter_mut().find(|(n, _)| same(n, name)) {
            Some(l) => l.1 = at,
            None => self.locals.push((name, at)),
        }
    }

    fn global_label(&mut self, name: &'static str) {
        self.fail(DynasmError::UnknownLabel(LabelKind::Global(name)));
    }

    fn dynamic_label(&mut self, id: DynamicLabel) {
        self.fail(DynasmError::UnknownLabel(LabelKind::Dynamic(id)));
    }

    fn global_relocation(
        &mut self,
        name: &'static str,
        _target_offset: isize,
        _field_offset: u8,
        _ref_offset: u8,
        _kind: X64Relocation,
    ) {
        self.fail(DynasmError::UnknownLabel(LabelKind::Global(name)));
    }

    fn dynamic_relocation(
        &mut self,
        id: DynamicLabel,
        _target_offset: isize,
        _field_offset: u8,
        _ref_offset: u8,
        _kind: X64Relocation,
    ) {
        self.fail(DynasmError::UnknownLabel(LabelKind::Dynamic(id)));
    }

    fn forward_relocation(
        &mut self,
        name: &'static str,
        target_offset: isize,
        field_offset: u8,
        ref_offset: u8,
        kind: X64Relocation,
    ) {
        let loc = self.here(target_offset, field_offset, ref_offset, kind);
        self.forward.push((name, loc));
    }

    fn backward_relocation(
        &mut self,
        name: &'static str,
        target_offset: isize,
        field_offset: u8,
        ref_offset: u8,
        kind: X64Relocation,
    ) {
        let loc = self.here(target_offset, field_offset, ref_offset, kind);
        match self.locals.iter().find(|(n, _)| same(n, name)) {
            Some(&(_, at)) => {
                if patch(&mut self.ops, &loc, at).is_err() {
                    self.fail(DynasmError::ImpossibleRelocation(TargetKind::Local(name)));
                }
            }
            None => self.fail(DynasmError::UnknownLabel(LabelKind::Local(name))),
        }
    }

    fn value_relocation(
        &mut self,
        value: usize,
        field_offset: u8,
        ref_offset: u8,
        kind: X64Relocation,
    ) {
        let loc = self.here(0, field_offset, ref_offset, kind);
        if patch(&mut self.ops, &loc, value).is_err() {
            self.fail(DynasmError::ImpossibleRelocation(TargetKind::Value(value)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynasm::dynasm;

    /// Local labels forward and backward, patched as the x86 encoding
    /// says (rel32 from the next instruction), a redefined local label
    /// found by the references after it.
    #[test]
    fn labels_resolve() {
        let mut ops = Asm::new();
        dynasm!(ops
            ; .arch x64
            ; jmp >a          // 0: e9 +2
            ; nop
            ; nop
            ; a:              // 7
            ; jmp <a          // 7: e9 -5
            ; jmp >b          // 12: e9 +0
            ; b:
            ; a:              // 17
            ; jmp <a          // 17: e9 -5
        );
        let out = ops.finish().unwrap().to_vec();
        #[rustfmt::skip]
        let want = [
            0xE9, 2, 0, 0, 0, 0x90, 0x90,
            0xE9, 0xFB, 0xFF, 0xFF, 0xFF,
            0xE9, 0, 0, 0, 0,
            0xE9, 0xFB, 0xFF, 0xFF, 0xFF,
        ];
        assert_eq!(out, want);
        ops.clear();
        dynasm!(ops ; .arch x64 ; jmp >nowhere);
        assert!(ops.finish().is_err(), "a label never defined");
    }
}
