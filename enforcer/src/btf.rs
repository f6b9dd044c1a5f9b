//! Kernel struct field offsets, read from the kernel's BTF at load time.
//!
//! rustc emits no CO-RE relocations for our eBPF programs, so a program
//! compiled once cannot follow `struct file` or `struct dentry` as their
//! fields move between kernel versions. Instead the controller reads the
//! offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`) when it
//! loads the programs and hands them over as read-only globals
//! (`enforcer_common::file::KernelOffsets`).
//!
//! The BTF reader is our own and deliberately small. aya-obj 0.3 parses BTF
//! but keeps type lookup and struct members crate-private, so it cannot
//! answer "where is `f_inode` in `struct file`". The format is a stable
//! kernel UAPI (`include/uapi/linux/btf.h`, `Documentation/bpf/btf.rst`) and
//! we need only a part of it: walking the type section, structs, unions,
//! integers, pointers, typedefs and type modifiers.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// Where the running kernel publishes its own BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Byte offsets of the kernel struct fields the `file_open` program reads.
///
/// Nested names (`f_path.dentry`, `d_name.name`) are the sum of the
/// embedded struct's offset and the field's offset inside it, so the
/// program reads them with one load from the outer struct.
/// The offsets are the shared type the kernel program reads them as.
pub type FileOffsets = enforcer_common::KernelOffsets;

/// Why the offsets could not be read; each names what the kernel lacks or
/// which struct and field changed shape, so an operator can tell a kernel
/// built without BTF from one the enforcer does not understand yet.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("{VMLINUX_BTF} is missing: the kernel needs CONFIG_DEBUG_INFO_BTF=y")]
    Missing,
    #[error("reading BTF from {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not valid BTF: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("the kernel's BTF has no struct {struct_name}")]
    StructNotFound { struct_name: &'static str },
    #[error("struct {struct_name} has no field {field}")]
    FieldNotFound {
        struct_name: &'static str,
        field: &'static str,
    },
    #[error(
        "struct {struct_name}: {parent} is {found}, not a struct or union, so {field} cannot be reached"
    )]
    NotComposite {
        struct_name: &'static str,
        field: &'static str,
        parent: String,
        found: String,
    },
    #[error(
        "struct {struct_name} field {field} is a bitfield; the programs need a byte-aligned field"
    )]
    Bitfield {
        struct_name: &'static str,
        field: &'static str,
    },
    #[error(
        "struct {struct_name} field {field} is at bit offset {bit_offset}, not on a byte boundary"
    )]
    Unaligned {
        struct_name: &'static str,
        field: &'static str,
        bit_offset: u64,
    },
    #[error(
        "struct {struct_name} field {field} is {found}, but the programs read it as {expected}"
    )]
    UnexpectedType {
        struct_name: &'static str,
        field: &'static str,
        expected: Shape,
        found: String,
    },
}

/// What the programs read at a field, checked so that a kernel that
/// changes a field's type fails at load time instead of yielding garbage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Pointer,
    Int { bytes: u32 },
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pointer => f.write_str("a pointer"),
            Self::Int { bytes } => f.write_str(&sized(*bytes, "integer")),
        }
    }
}

/// "a 4-byte integer", "an 8-byte integer", for error messages.
fn sized(bytes: u32, what: &str) -> String {
    let article = if matches!(bytes, 8 | 11 | 18) {
        "an"
    } else {
        "a"
    };
    format!("{article} {bytes}-byte {what}")
}

/// Reads the offsets from the running kernel's BTF.
pub fn file_offsets() -> Result<FileOffsets, BtfError> {
    file_offsets_from(Path::new(VMLINUX_BTF))
}

/// Reads the offsets from any raw BTF file, such as another kernel's
/// `.BTF` section.
pub fn file_offsets_from(path: &Path) -> Result<FileOffsets, BtfError> {
    let btf = Btf::read(path)?;
    let pointer = Shape::Pointer;
    let u32_int = Shape::Int { bytes: 4 };
    // `unsigned long`: the programs run on 64-bit kernels only.
    let u64_int = Shape::Int { bytes: 8 };
    Ok(FileOffsets {
        file_f_inode: btf.offset("file", "f_inode", pointer)?,
        file_f_path_dentry: btf.offset("file", "f_path.dentry", pointer)?,
        file_f_mode: btf.offset("file", "f_mode", u32_int)?,
        inode_i_ino: btf.offset("inode", "i_ino", u64_int)?,
        inode_i_sb: btf.offset("inode", "i_sb", pointer)?,
        super_block_s_dev: btf.offset("super_block", "s_dev", u32_int)?,
        dentry_d_parent: btf.offset("dentry", "d_parent", pointer)?,
        dentry_d_name_name: btf.offset("dentry", "d_name.name", pointer)?,
        dentry_d_name_len: btf.offset("dentry", "d_name.len", u32_int)?,
        dentry_d_inode: btf.offset("dentry", "d_inode", pointer)?,
        super_block_s_magic: btf.offset("super_block", "s_magic", u64_int)?,
        task_tgid: btf.offset("task_struct", "tgid", u32_int)?,
        task_cgroups: btf.offset("task_struct", "cgroups", pointer)?,
        css_set_dfl_cgrp: btf.offset("css_set", "dfl_cgrp", pointer)?,
        cgroup_kn: btf.offset("cgroup", "kn", pointer)?,
        cgroup_level: btf.offset("cgroup", "level", u32_int)?,
        cgroup_self_parent: btf.offset("cgroup", "self.parent", pointer)?,
        css_cgroup: btf.offset("cgroup_subsys_state", "cgroup", pointer)?,
        kernfs_node_id: btf.offset("kernfs_node", "id", u64_int)?,
        unix_sock_path_dentry: btf.offset("unix_sock", "path.dentry", pointer)?,
        socket_sk: btf.offset("socket", "sk", pointer)?,
        vfsmount_mnt_sb: btf.offset("vfsmount", "mnt_sb", pointer)?,
    })
}

// BTF type kinds (`BTF_KIND_*` in include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// `struct btf_header` without the fields newer kernels may append (its
/// `hdr_len` says where the sections start).
const HEADER_LEN: usize = 24;
/// `struct btf_type`, which every type record starts with.
const TYPE_RECORD_LEN: usize = 12;
/// Bounds the walks through typedef chains and anonymous members, which in
/// valid BTF are short but in a corrupt file could loop.
const MAX_DEPTH: usize = 64;

/// The parts of a BTF file this module needs.
struct Btf {
    /// For error messages.
    path: PathBuf,
    /// Indexed by type id; id 0 is `void` and has no record.
    types: Vec<Type>,
    strings: Vec<u8>,
}

/// One type record, reduced to what offset lookups use.
struct Type {
    name_offset: u32,
    kind: u32,
    /// The size in bytes for integers, structs and unions; the referenced
    /// type id for pointers, typedefs and modifiers.
    size_or_ref: u32,
    /// For integers, the encoding word: bit width and bit offset, which
    /// mark a bitfield in BTF that predates `kind_flag`.
    int_encoding: u32,
    members: Vec<Member>,
}

struct Member {
    /// 0 for an anonymous struct or union member.
    name_offset: u32,
    type_id: u32,
    bit_offset: u32,
    /// Non-zero for a bitfield in a `kind_flag` struct or union.
    bitfield_size: u32,
}

/// Where a field lies, relative to the struct the lookup started from.
#[derive(Clone, Copy, Debug)]
struct Located {
    bit_offset: u64,
    type_id: u32,
    bitfield_size: u32,
}

impl Type {
    const fn is_composite(&self) -> bool {
        matches!(self.kind, KIND_STRUCT | KIND_UNION)
    }

    /// Bit width and bit offset of an integer type; a bitfield in BTF
    /// without `kind_flag` is an integer narrower than its size.
    const fn int_bits(&self) -> (u32, u32) {
        (self.int_encoding & 0xff, (self.int_encoding >> 16) & 0xff)
    }

    fn describe(&self) -> String {
        match self.kind {
            KIND_INT => sized(self.size_or_ref, "integer"),
            KIND_PTR => "a pointer".to_owned(),
            KIND_ARRAY => "an array".to_owned(),
            KIND_STRUCT => "a struct".to_owned(),
            KIND_UNION => "a union".to_owned(),
            KIND_ENUM | KIND_ENUM64 => sized(self.size_or_ref, "enum"),
            KIND_FWD => "a forward declaration".to_owned(),
            KIND_FUNC_PROTO => "a function type".to_owned(),
            KIND_FLOAT => "a float".to_owned(),
            kind => format!("a BTF kind {kind} type"),
        }
    }
}

/// Reads native `u32`s of either byte order from a section.
struct Reader<'a> {
    data: &'a [u8],
    big_endian: bool,
    section: &'static str,
}

impl Reader<'_> {
    fn u32(&self, at: usize) -> Result<u32, String> {
        let bytes = at
            .checked_add(4)
            .and_then(|end| self.data.get(at..end))
            .ok_or_else(|| {
                format!(
                    "the {} is {} bytes long but a record reaches past byte {at}",
                    self.section,
                    self.data.len()
                )
            })?;
        let bytes: [u8; 4] = bytes.try_into().expect("the slice is 4 bytes long");
        Ok(if self.big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    }
}

impl Btf {
    fn read(path: &Path) -> Result<Self, BtfError> {
        let data = fs::read(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound && path == Path::new(VMLINUX_BTF) {
                BtfError::Missing
            } else {
                BtfError::Read {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        Self::parse(path, &data)
    }

    /// Parses raw BTF (`/sys/kernel/btf/vmlinux` or a `.BTF` section) of
    /// either byte order, which the magic number tells.
    fn parse(path: &Path, data: &[u8]) -> Result<Self, BtfError> {
        let (types, strings) =
            Self::parse_sections(data).map_err(|reason| BtfError::Malformed {
                path: path.to_owned(),
                reason,
            })?;
        Ok(Self {
            path: path.to_owned(),
            types,
            strings,
        })
    }

    fn parse_sections(data: &[u8]) -> Result<(Vec<Type>, Vec<u8>), String> {
        let big_endian = match data.get(..4) {
            Some([0x9f, 0xeb, 1, _]) => false,
            Some([0xeb, 0x9f, 1, _]) => true,
            Some([0x9f, 0xeb, version, _] | [0xeb, 0x9f, version, _]) => {
                return Err(format!(
                    "BTF version {version} is not the supported version 1"
                ));
            }
            _ => return Err("it does not start with the BTF magic number 0xeb9f".to_owned()),
        };
        let header = Reader {
            data,
            big_endian,
            section: "file",
        };
        let header_len = header.u32(4)? as usize;
        if header_len < HEADER_LEN {
            return Err(format!("header length {header_len} is below {HEADER_LEN}"));
        }
        let section = |offset_at: usize, name: &str| -> Result<&[u8], String> {
            let offset = header.u32(offset_at)? as usize;
            let len = header.u32(offset_at + 4)? as usize;
            header_len
                .checked_add(offset)
                .and_then(|start| Some(start..start.checked_add(len)?))
                .and_then(|range| data.get(range))
                .ok_or_else(|| {
                    format!(
                        "the {name} section ({len} bytes at {offset} after the header) \
                         runs past the end of the file ({} bytes)",
                        data.len()
                    )
                })
        };
        let type_section = section(8, "type")?;
        let strings = section(16, "string")?.to_vec();
        let types = Self::parse_types(&Reader {
            data: type_section,
            big_endian,
            section: "type section",
        })?;
        Ok((types, strings))
    }

    fn parse_types(reader: &Reader<'_>) -> Result<Vec<Type>, String> {
        let mut types = vec![Type {
            name_offset: 0,
            kind: 0,
            size_or_ref: 0,
            int_encoding: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < reader.data.len() {
            let id = types.len();
            let info = reader.u32(at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let vlen = (info & 0xffff) as usize;
            let mut ty = Type {
                name_offset: reader.u32(at)?,
                kind,
                size_or_ref: reader.u32(at + 8)?,
                int_encoding: 0,
                members: Vec::new(),
            };
            at += TYPE_RECORD_LEN;
            // Each kind is followed by its own trailing data; the reader
            // must know every kind's length to find the next record.
            let trailing = match kind {
                KIND_INT => {
                    ty.int_encoding = reader.u32(at)?;
                    4
                }
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    ty.members = (0..vlen)
                        .map(|index| Self::parse_member(reader, at + index * 12, kind_flag))
                        .collect::<Result<_, _>>()?;
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_VAR | KIND_DECL_TAG => 4,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                _ => {
                    return Err(format!(
                        "type {id} has kind {kind}, unknown to this reader \
                         (BTF from a kernel newer than the enforcer?)"
                    ));
                }
            };
            at += trailing;
            if at > reader.data.len() {
                return Err(format!("the type section ends inside type {id}"));
            }
            types.push(ty);
        }
        Ok(types)
    }

    /// A struct or union member (`struct btf_member`). In a `kind_flag`
    /// struct the offset word holds the bitfield size in its top 8 bits
    /// and the bit offset in the low 24.
    fn parse_member(reader: &Reader<'_>, at: usize, kind_flag: bool) -> Result<Member, String> {
        let offset = reader.u32(at + 8)?;
        let (bit_offset, bitfield_size) = if kind_flag {
            (offset & 0x00ff_ffff, offset >> 24)
        } else {
            (offset, 0)
        };
        Ok(Member {
            name_offset: reader.u32(at)?,
            type_id: reader.u32(at + 4)?,
            bit_offset,
            bitfield_size,
        })
    }

    fn malformed(&self, reason: String) -> BtfError {
        BtfError::Malformed {
            path: self.path.clone(),
            reason,
        }
    }

    fn type_by_id(&self, id: u32) -> Result<&Type, BtfError> {
        self.types
            .get(id as usize)
            .ok_or_else(|| self.malformed(format!("type id {id} does not exist")))
    }

    /// The NUL-terminated name at `offset` in the string section; empty
    /// for anonymous types and members.
    fn name(&self, offset: u32) -> Result<&[u8], BtfError> {
        let tail = self
            .strings
            .get(offset as usize..)
            .ok_or_else(|| self.malformed(format!("string offset {offset} is out of range")))?;
        let end = tail.iter().position(|&byte| byte == 0).ok_or_else(|| {
            self.malformed(format!(
                "the string at offset {offset} is not NUL-terminated"
            ))
        })?;
        Ok(&tail[..end])
    }

    /// Follows typedefs, `const`, `volatile`, `restrict` and type tags to
    /// the type underneath (`const struct path` -> `struct path`).
    fn resolve(&self, mut id: u32) -> Result<&Type, BtfError> {
        for _ in 0..MAX_DEPTH {
            let ty = self.type_by_id(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_ref;
                }
                _ => return Ok(ty),
            }
        }
        Err(self.malformed(format!(
            "type {id} ends a typedef chain over {MAX_DEPTH} long"
        )))
    }

    /// The first struct of that name; BTF deduplication leaves one per
    /// layout, and the core VFS structs have a single layout.
    fn struct_by_name(&self, struct_name: &'static str) -> Result<&Type, BtfError> {
        for ty in &self.types {
            if ty.kind == KIND_STRUCT && self.name(ty.name_offset)? == struct_name.as_bytes() {
                return Ok(ty);
            }
        }
        Err(BtfError::StructNotFound { struct_name })
    }

    /// Finds the member `name` of `container`, also inside its anonymous
    /// struct and union members (kernels move fields into anonymous unions
    /// between versions), adding the anonymous members' offsets.
    fn find_member(
        &self,
        container: &Type,
        name: &[u8],
        depth: usize,
    ) -> Result<Option<Located>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(self.malformed(format!("anonymous members nest over {MAX_DEPTH} deep")));
        }
        for member in &container.members {
            let member_name = self.name(member.name_offset)?;
            if member_name == name {
                return Ok(Some(Located {
                    bit_offset: u64::from(member.bit_offset),
                    type_id: member.type_id,
                    bitfield_size: member.bitfield_size,
                }));
            }
            if member_name.is_empty() {
                let inner = self.resolve(member.type_id)?;
                if inner.is_composite()
                    && let Some(found) = self.find_member(inner, name, depth + 1)?
                {
                    return Ok(Some(Located {
                        bit_offset: found.bit_offset + u64::from(member.bit_offset),
                        ..found
                    }));
                }
            }
        }
        Ok(None)
    }

    /// Locates a field given as a dotted path through embedded structs
    /// (`"f_path.dentry"`), summing the offsets along the way.
    fn locate(&self, struct_name: &'static str, field: &'static str) -> Result<Located, BtfError> {
        let mut container = self.struct_by_name(struct_name)?;
        let mut located: Option<Located> = None;
        let mut walked = 0;
        for name in field.split('.') {
            if let Some(parent) = located {
                let inner = self.resolve(parent.type_id)?;
                if !inner.is_composite() {
                    return Err(BtfError::NotComposite {
                        struct_name,
                        field,
                        parent: field[..walked - 1].to_owned(),
                        found: inner.describe(),
                    });
                }
                container = inner;
            }
            let found = self
                .find_member(container, name.as_bytes(), 0)?
                .ok_or(BtfError::FieldNotFound { struct_name, field })?;
            located = Some(Located {
                bit_offset: found.bit_offset + located.map_or(0, |parent| parent.bit_offset),
                ..found
            });
            walked += name.len() + 1;
        }
        located.ok_or(BtfError::FieldNotFound { struct_name, field })
    }

    /// The byte offset of a field the programs read as `shape`, refusing
    /// bitfields, unaligned fields and fields of another type or width.
    fn offset(
        &self,
        struct_name: &'static str,
        field: &'static str,
        shape: Shape,
    ) -> Result<u32, BtfError> {
        let located = self.locate(struct_name, field)?;
        let bitfield = BtfError::Bitfield { struct_name, field };
        if located.bitfield_size != 0 {
            return Err(bitfield);
        }
        let ty = self.resolve(located.type_id)?;
        let fits = match shape {
            Shape::Pointer => ty.kind == KIND_PTR,
            Shape::Int { bytes } => {
                let int = ty.kind == KIND_INT && ty.size_or_ref == bytes;
                // An integer narrower than its size is a bitfield in BTF
                // that predates `kind_flag`.
                if int && ty.int_bits() != (bytes * 8, 0) {
                    return Err(bitfield);
                }
                int
            }
        };
        if !fits {
            return Err(BtfError::UnexpectedType {
                struct_name,
                field,
                expected: shape,
                found: ty.describe(),
            });
        }
        if located.bit_offset % 8 != 0 {
            return Err(BtfError::Unaligned {
                struct_name,
                field,
                bit_offset: located.bit_offset,
            });
        }
        u32::try_from(located.bit_offset / 8).map_err(|_| {
            self.malformed(format!(
                "struct {struct_name} field {field} lies beyond 4 GiB"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        io::Read as _,
        process::{Command, Stdio},
    };

    use super::*;

    /// Checks what holds for any `x86_64` kernel, so that a lookup landing
    /// on the wrong member shows up without pinning one kernel's layout.
    fn check_consistent(btf: &Btf, offsets: &FileOffsets) {
        let path_dentry = btf.locate("path", "dentry").unwrap().bit_offset / 8;
        let file_f_path = btf.locate("file", "f_path").unwrap().bit_offset / 8;
        let qstr_name = btf.locate("qstr", "name").unwrap().bit_offset / 8;
        let qstr_len = btf.locate("qstr", "len").unwrap().bit_offset / 8;
        let dentry_d_name = btf.locate("dentry", "d_name").unwrap().bit_offset / 8;
        // struct path { struct vfsmount *mnt; struct dentry *dentry; }
        assert_eq!(path_dentry, 8);
        // struct qstr { union { struct { u32 hash; u32 len; }; u64 hash_len; };
        //               const unsigned char *name; } on little-endian.
        assert_eq!((qstr_len, qstr_name), (4, 8));
        assert_eq!(
            u64::from(offsets.file_f_path_dentry),
            file_f_path + path_dentry
        );
        assert_eq!(
            u64::from(offsets.dentry_d_name_name),
            dentry_d_name + qstr_name
        );
        assert_eq!(offsets.dentry_d_name_len + 4, offsets.dentry_d_name_name);

        let FileOffsets {
            file_f_inode,
            file_f_path_dentry,
            file_f_mode,
            inode_i_ino,
            inode_i_sb,
            super_block_s_dev,
            dentry_d_parent,
            dentry_d_name_name,
            dentry_d_name_len,
            dentry_d_inode,
            ..
        } = *offsets;
        // Every one of these structs starts with other fields.
        for (name, offset) in [
            ("file_f_inode", file_f_inode),
            ("file_f_path_dentry", file_f_path_dentry),
            ("file_f_mode", file_f_mode),
            ("inode_i_ino", inode_i_ino),
            ("inode_i_sb", inode_i_sb),
            ("super_block_s_dev", super_block_s_dev),
            ("dentry_d_parent", dentry_d_parent),
            ("dentry_d_name_name", dentry_d_name_name),
            ("dentry_d_name_len", dentry_d_name_len),
            ("dentry_d_inode", dentry_d_inode),
        ] {
            assert_ne!(offset, 0, "{name}");
        }
        // Natural alignment of pointers, `unsigned long` and u32.
        for pointer in [
            file_f_inode,
            file_f_path_dentry,
            inode_i_sb,
            dentry_d_parent,
            dentry_d_name_name,
            dentry_d_inode,
            inode_i_ino,
        ] {
            assert_eq!(pointer % 8, 0, "{offsets:?}");
        }
        for int in [file_f_mode, super_block_s_dev, dentry_d_name_len] {
            assert_eq!(int % 4, 0, "{offsets:?}");
        }
        // The guards' fields: pointers and 8-byte integers, then ints.
        for eight in [
            offsets.super_block_s_magic,
            offsets.task_cgroups,
            offsets.css_set_dfl_cgrp,
            offsets.cgroup_kn,
            offsets.cgroup_self_parent,
            offsets.kernfs_node_id,
            offsets.unix_sock_path_dentry,
            offsets.socket_sk,
            offsets.vfsmount_mnt_sb,
        ] {
            assert_eq!(eight % 8, 0, "{offsets:?}");
        }
        for int in [offsets.task_tgid, offsets.cgroup_level] {
            assert_eq!(int % 4, 0, "{offsets:?}");
        }
        assert_ne!(offsets.task_tgid, offsets.task_cgroups);
        // `struct unix_sock` starts with its `struct sock`; the path is after it.
        assert!(offsets.unix_sock_path_dentry > 8, "{offsets:?}");
        // Different fields of one struct cannot share an offset.
        let distinct = |fields: &[u32]| {
            let mut sorted = fields.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), fields.len(), "{offsets:?}");
        };
        distinct(&[file_f_inode, file_f_path_dentry, file_f_mode]);
        distinct(&[inode_i_ino, inode_i_sb]);
        distinct(&[
            dentry_d_parent,
            dentry_d_name_name,
            dentry_d_name_len,
            dentry_d_inode,
        ]);
    }

    #[test]
    fn host_kernel_offsets_are_consistent() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: {VMLINUX_BTF} is missing");
            return;
        }
        let offsets = file_offsets().unwrap();
        eprintln!(
            "host kernel {}: {offsets:#?}",
            fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        );
        check_consistent(&Btf::read(path).unwrap(), &offsets);
    }

    /// The Debian 6.1 cloud kernel the VM tests boot, whose layout differs
    /// from recent kernels (`f_path` and `d_name` are plain members there,
    /// not in anonymous unions with `const` views). The numbers match
    /// `pahole -C <struct>` on that kernel's BTF.
    #[test]
    fn debian_6_1_kernel_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let Some((version, btf_path)) = debian_6_1_btf(dir.path()) else {
            return;
        };
        let offsets = file_offsets_from(&btf_path).unwrap();
        eprintln!("Debian kernel {version}: {offsets:#?}");
        check_consistent(&Btf::read(&btf_path).unwrap(), &offsets);
        assert_eq!(
            offsets,
            FileOffsets {
                file_f_inode: 32,
                file_f_path_dentry: 24,
                file_f_mode: 68,
                inode_i_ino: 64,
                inode_i_sb: 40,
                super_block_s_dev: 16,
                dentry_d_parent: 24,
                dentry_d_name_name: 40,
                dentry_d_name_len: 36,
                dentry_d_inode: 48,
                super_block_s_magic: 96,
                task_tgid: 2420,
                task_cgroups: 3600,
                css_set_dfl_cgrp: 128,
                cgroup_kn: 248,
                cgroup_level: 208,
                cgroup_self_parent: 192,
                css_cgroup: 0,
                kernfs_node_id: 104,
                unix_sock_path_dentry: 792,
                socket_sk: 24,
                vfsmount_mnt_sb: 8,
            }
        );
    }

    /// Extracts the `.BTF` section of a Debian 6.1 kernel that
    /// `cargo xtask vm` unpacked under `target/vm/`, into `dir`. The BTF
    /// sits inside the LZ4-compressed vmlinux of the `vmlinuz` image, so
    /// this needs the `lz4` and `objcopy` tools; without the kernel or the
    /// tools it says why and returns `None`.
    fn debian_6_1_btf(dir: &Path) -> Option<(String, PathBuf)> {
        const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
        let vm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/vm");
        let found = fs::read_dir(&vm).ok().and_then(|entries| {
            entries.flatten().find_map(|entry| {
                let version = entry.file_name().to_string_lossy().into_owned();
                let vmlinuz = entry.path().join(format!("boot/vmlinuz-{version}"));
                (version.starts_with("6.1.") && vmlinuz.is_file()).then_some((version, vmlinuz))
            })
        });
        let Some((version, vmlinuz)) = found else {
            eprintln!("skipped: no 6.1 kernel under {}", vm.display());
            return None;
        };
        for tool in ["lz4", "objcopy"] {
            if Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
            {
                eprintln!("skipped: `{tool}` is not installed");
                return None;
            }
        }

        // The kernel's LZ4 payload is in the legacy frame format; the image
        // may hold the magic elsewhere too, so try each until one
        // decompresses to an ELF file.
        let image = fs::read(&vmlinuz).unwrap();
        let payload = dir.join("payload.lz4");
        let elf = dir.join("vmlinux");
        let is_elf = |path: &Path| {
            let mut magic = [0; 4];
            File::open(path)
                .and_then(|mut file| file.read_exact(&mut magic))
                .is_ok()
                && magic == *b"\x7fELF"
        };
        let starts = image
            .windows(LZ4_LEGACY_MAGIC.len())
            .enumerate()
            .filter(|(_, window)| *window == LZ4_LEGACY_MAGIC)
            .map(|(start, _)| start);
        let mut decompressed = false;
        for start in starts {
            fs::write(&payload, &image[start..]).unwrap();
            // lz4 fails on the bytes after the stream but has written the
            // whole vmlinux by then, so the ELF magic decides.
            Command::new("lz4")
                .args(["-d", "-c", "-q"])
                .arg(&payload)
                .stdout(File::create(&elf).unwrap())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            if is_elf(&elf) {
                decompressed = true;
                break;
            }
        }
        assert!(
            decompressed,
            "no LZ4 vmlinux found in {}",
            vmlinuz.display()
        );

        let btf = dir.join("vmlinux.btf");
        let status = Command::new("objcopy")
            .args(["-O", "binary", "--only-section=.BTF"])
            .arg(&elf)
            .arg(&btf)
            .status()
            .unwrap();
        assert!(status.success(), "objcopy: {status}");
        Some((version, btf))
    }

    /// Builds small BTF files for the lookup rules, in either byte order.
    struct Builder {
        big_endian: bool,
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new(big_endian: bool) -> Self {
            Self {
                big_endian,
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn word(&mut self, value: u32) {
            let bytes = if self.big_endian {
                value.to_be_bytes()
            } else {
                value.to_le_bytes()
            };
            self.types.extend_from_slice(&bytes);
        }

        fn string(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let offset = u32::try_from(self.strings.len()).unwrap();
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            offset
        }

        fn record(&mut self, name: &str, kind: u32, vlen: u32, kind_flag: bool, size: u32) -> u32 {
            let name = self.string(name);
            self.word(name);
            self.word(u32::from(kind_flag) << 31 | kind << 24 | vlen);
            self.word(size);
            self.next_id += 1;
            self.next_id - 1
        }

        fn int(&mut self, name: &str, bytes: u32, bits: u32) -> u32 {
            let id = self.record(name, KIND_INT, 0, false, bytes);
            self.word(bits);
            id
        }

        fn reference(&mut self, name: &str, kind: u32, target: u32) -> u32 {
            self.record(name, kind, 0, false, target)
        }

        /// `members`: name, type id and the raw offset word.
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            kind_flag: bool,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let vlen = u32::try_from(members.len()).unwrap();
            let id = self.record(name, kind, vlen, kind_flag, size);
            for &(member, type_id, offset) in members {
                let member = self.string(member);
                self.word(member);
                self.word(type_id);
                self.word(offset);
            }
            id
        }

        fn finish(self) -> Vec<u8> {
            let mut data = Vec::new();
            let word = |data: &mut Vec<u8>, value: u32| {
                data.extend_from_slice(&if self.big_endian {
                    value.to_be_bytes()
                } else {
                    value.to_le_bytes()
                });
            };
            data.extend_from_slice(if self.big_endian {
                &[0xeb, 0x9f, 1, 0]
            } else {
                &[0x9f, 0xeb, 1, 0]
            });
            let types_len = u32::try_from(self.types.len()).unwrap();
            let strings_len = u32::try_from(self.strings.len()).unwrap();
            for value in [24, 0, types_len, types_len, strings_len] {
                word(&mut data, value);
            }
            data.extend_from_slice(&self.types);
            data.extend_from_slice(&self.strings);
            data
        }
    }

    /// A miniature of the kernel's layout: `struct qstr` with `len` in an
    /// anonymous struct in an anonymous union, `struct dentry` holding it
    /// as `const struct qstr d_name` through a typedef and an anonymous
    /// union, and a `kind_flag` struct with bitfields.
    fn sample(big_endian: bool) -> Vec<u8> {
        let mut b = Builder::new(big_endian);
        let u32_ty = b.int("unsigned int", 4, 32);
        let u64_ty = b.int("long long unsigned int", 8, 64);
        let u32_typedef = b.reference("u32", KIND_TYPEDEF, u32_ty);
        let char_ty = b.int("unsigned char", 1, 8);
        let name_ptr = b.reference("", KIND_PTR, char_ty);
        let hash_len = b.composite(
            KIND_STRUCT,
            "",
            8,
            false,
            &[("hash", u32_typedef, 0), ("len", u32_typedef, 32)],
        );
        let hash_union = b.composite(
            KIND_UNION,
            "",
            8,
            false,
            &[("", hash_len, 0), ("hash_len", u64_ty, 0)],
        );
        let qstr = b.composite(
            KIND_STRUCT,
            "qstr",
            16,
            false,
            &[("", hash_union, 0), ("name", name_ptr, 64)],
        );
        let qstr_typedef = b.reference("qstr_t", KIND_TYPEDEF, qstr);
        let const_qstr = b.reference("", KIND_CONST, qstr_typedef);
        let name_union = b.composite(
            KIND_UNION,
            "",
            16,
            false,
            &[("__d_name", qstr, 0), ("d_name", const_qstr, 0)],
        );
        let dentry = b.record("dentry", KIND_FWD, 0, false, 0);
        let dentry_ptr = b.reference("", KIND_PTR, dentry);
        b.composite(
            KIND_STRUCT,
            "dentry",
            48,
            false,
            &[
                ("d_flags", u32_ty, 0),
                ("d_parent", dentry_ptr, 64),
                ("", name_union, 128),
                ("d_odd", u32_ty, 44),
            ],
        );
        let narrow = b.int("", 4, 3);
        b.composite(
            KIND_STRUCT,
            "flags",
            16,
            true,
            &[
                ("small", u32_ty, 3 << 24 | 4),
                ("whole", u32_ty, 32),
                ("pointer", name_ptr, 64),
                ("old_style", narrow, 96),
            ],
        );
        b.finish()
    }

    fn parse(data: &[u8]) -> Btf {
        Btf::parse(Path::new("sample.btf"), data).unwrap()
    }

    #[test]
    fn btf_finds_fields_in_anonymous_members_and_through_modifiers() {
        for big_endian in [false, true] {
            let btf = parse(&sample(big_endian));
            let u32_int = Shape::Int { bytes: 4 };
            assert_eq!(btf.offset("qstr", "len", u32_int).unwrap(), 4);
            assert_eq!(btf.offset("qstr", "name", Shape::Pointer).unwrap(), 8);
            assert_eq!(btf.offset("dentry", "d_parent", Shape::Pointer).unwrap(), 8);
            assert_eq!(btf.offset("dentry", "d_name.len", u32_int).unwrap(), 20);
            assert_eq!(
                btf.offset("dentry", "d_name.name", Shape::Pointer).unwrap(),
                24
            );
            assert_eq!(btf.offset("dentry", "__d_name.hash", u32_int).unwrap(), 16);
        }
    }

    #[test]
    fn btf_reads_kind_flag_offsets_and_refuses_bitfields() {
        let btf = parse(&sample(false));
        let u32_int = Shape::Int { bytes: 4 };
        assert_eq!(btf.offset("flags", "whole", u32_int).unwrap(), 4);
        assert_eq!(btf.offset("flags", "pointer", Shape::Pointer).unwrap(), 8);
        assert!(matches!(
            btf.offset("flags", "small", u32_int),
            Err(BtfError::Bitfield {
                struct_name: "flags",
                field: "small"
            })
        ));
        assert!(matches!(
            btf.offset("flags", "old_style", u32_int),
            Err(BtfError::Bitfield { .. })
        ));
        assert!(matches!(
            btf.offset("dentry", "d_odd", u32_int),
            Err(BtfError::Unaligned { bit_offset: 44, .. })
        ));
    }

    #[test]
    fn btf_lookup_errors_name_struct_and_field() {
        let btf = parse(&sample(false));
        let u32_int = Shape::Int { bytes: 4 };
        let message = |result: Result<u32, BtfError>| result.unwrap_err().to_string();
        assert_eq!(
            message(btf.offset("inode", "i_ino", u32_int)),
            "the kernel's BTF has no struct inode"
        );
        assert_eq!(
            message(btf.offset("dentry", "d_name.nope", u32_int)),
            "struct dentry has no field d_name.nope"
        );
        assert_eq!(
            message(btf.offset("dentry", "d_flags.x", u32_int)),
            "struct dentry: d_flags is a 4-byte integer, not a struct or union, so \
             d_flags.x cannot be reached"
        );
        assert_eq!(
            message(btf.offset("qstr", "name", u32_int)),
            "struct qstr field name is a pointer, but the programs read it as a 4-byte integer"
        );
        assert_eq!(
            message(btf.offset("dentry", "d_parent", Shape::Int { bytes: 8 })),
            "struct dentry field d_parent is a pointer, but the programs read it as an 8-byte \
             integer"
        );
    }

    #[test]
    fn btf_refuses_malformed_files() {
        let data = sample(false);
        let error = |data: &[u8]| {
            Btf::parse(Path::new("bad.btf"), data)
                .err()
                .expect("parse should fail")
                .to_string()
        };
        assert_eq!(
            error(b"ELF!"),
            "bad.btf is not valid BTF: it does not start with the BTF magic number 0xeb9f"
        );
        assert!(error(&data[..data.len() - 1]).contains("runs past the end"));
        let mut unknown_kind = data.clone();
        // The first record's info word, in little-endian: kind 31.
        unknown_kind[24 + 7] = 31;
        assert!(error(&unknown_kind).contains("type 1 has kind 31"));
        let mut version = data;
        version[2] = 2;
        assert!(error(&version).contains("version 2"));
    }

    #[test]
    fn btf_missing_files_are_named() {
        let missing = Path::new("/nonexistent/vmlinux");
        let error = file_offsets_from(missing).unwrap_err().to_string();
        assert!(
            error.starts_with("reading BTF from /nonexistent/vmlinux: "),
            "{error}"
        );
        assert_eq!(
            BtfError::Missing.to_string(),
            "/sys/kernel/btf/vmlinux is missing: the kernel needs CONFIG_DEBUG_INFO_BTF=y"
        );
    }
}
